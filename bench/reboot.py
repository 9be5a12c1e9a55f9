#!/usr/bin/env python3
"""Reboot and fleet figures, on the test bed's Debian 12 system (systemd as PID 1; sysimage):

1. the boot time the boot service adds: `apply --all` as systemd ran it (the unit's start to
   exit, on the boot's critical path before sysinit.target) with 1 and with 5 installed updates,
   beside the boot with none installed (the unit skipped);
2. the time to roll one update over 3 guests (one vCPU each, sharing the host's cores) with the
   collection's rollout playbook (a canary, then a batch of two), per host; and the setup role
   (livesplice from a wheelhouse into each guest), once.

Run as root after scripts/setup.sh, on a quiet machine:
  .venv/bin/python bench/reboot.py [--runs N] [--skip-fleet]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from livesplice import debian, sysimage
from livesplice.create import create
from livesplice.testbed import Session
from livesplice.vmfleet import Fleet

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import edit_patch  # noqa: E402

KERNEL = "6.1.0-53-amd64"
NOP = '\tasm volatile("nop");\n'
# Five updates of five functions, independent of each other.
UPDATES = {
    "b-prctl": {"kernel/sys.c": [(
        "if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {",
        "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")]},
    "b-cmdline": {"fs/proc/cmdline.c": [("\tseq_puts(m, saved_command_line);",
                                         "\tseq_puts(m, saved_command_line);\n" + NOP.rstrip())]},
    "b-version": {"fs/proc/version.c": [("\tseq_printf(m, linux_proc_banner,",
                                         NOP + "\tseq_printf(m, linux_proc_banner,")]},
    "b-uptime": {"fs/proc/uptime.c": [("(idle.tv_nsec / (NSEC_PER_SEC / 100)));\n\treturn 0;",
                                       "(idle.tv_nsec / (NSEC_PER_SEC / 100)));\n" + NOP
                                       + "\treturn 0;")]},
    "b-loadavg": {"fs/proc/loadavg.c": [("->idr) - 1);\n\treturn 0;",
                                         "->idr) - 1);\n" + NOP + "\treturn 0;")]},
}


def make_packages(files: debian.KernelFiles, out: Path) -> list[Path]:
    made = []
    for name, edits in UPDATES.items():
        pkg = out / f"{name}.tar.gz"
        create(files.source_tree, files.config, edit_patch(files.source_tree, edits),
               update_id=name, output=pkg)
        made.append(pkg)
    return made


def boot(disk: Path, rw: list[str]) -> Session:
    s = Session(kernel=KERNEL, disk=disk, rwdirs=rw, boot_timeout=300)
    s.start()
    s.run(["systemctl", "is-system-running", "--wait"], timeout=240)
    return s


def unit_seconds(s: Session) -> float | None:
    out = s.run(["systemctl", "show", "livesplice.service", "-pExecMainStartTimestampMonotonic",
                 "-pExecMainExitTimestampMonotonic", "-pConditionResult"], check=True).out
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if props.get("ConditionResult") != "yes":
        return None
    return (int(props["ExecMainExitTimestampMonotonic"])
            - int(props["ExecMainStartTimestampMonotonic"])) / 1e6


def userspace_seconds(s: Session) -> float:
    out = s.run(["systemd-analyze", "time"], check=True).out
    # "Startup finished in 2.487s (kernel) + 6.810s (userspace) = 9.298s"
    part = out.split("+")[1].split("(userspace)")[0].strip()
    return parse_span(part)


def parse_span(text: str) -> float:
    total = 0.0
    for token in text.split():
        if token.endswith("ms"):
            total += float(token[:-2]) / 1000
        elif token.endswith("min"):
            total += float(token[:-3]) * 60
        elif token.endswith("s"):
            total += float(token[:-1])
    return total


def bench_boot(runs: int, work: Path, packages: list[Path]) -> dict:
    disk = sysimage.new_disk(work / "system.qcow2")
    wheels = sysimage.wheelhouse()
    rw = [str(work), str(wheels)]
    ls = f"{sysimage.VENV}/bin/livesplice"
    s = boot(disk, rw)
    try:
        sysimage.install_livesplice(s, wheels)
        s.run([ls, "service", "install"], check=True)
    finally:
        s.close()
    figures: dict = {}
    problems: list[str] = []
    for count in (0, 1, 5):
        if count:
            s = boot(disk, rw)
            try:
                have = len(json.loads(s.run([ls, "list", "--installed", "--json"],
                                            check=True).out))
                for pkg in packages[have:count]:
                    s.run([ls, "install", "--no-apply", str(pkg)], check=True, timeout=300)
            finally:
                s.close()
        unit, user = [], []
        for _ in range(runs):
            s = boot(disk, rw)
            try:
                applied = json.loads(s.run([ls, "list", "--json"], check=True).out)
                assert len(applied) == count, applied
                unit.append(unit_seconds(s))
                user.append(userspace_seconds(s))
                problems += s.dmesg_problems()
            finally:
                s.close()
        figures[count] = {"unit": unit, "userspace": user}
    figures["problems"] = problems
    return figures


def bench_fleet(work: Path, package: Path) -> dict:
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(REPO / "ansible"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_HOST_KEY_CHECKING="False")
    bin_dir = Path(sys.executable).parent
    kernels = ["6.1.0-53-amd64"] * 3
    with Fleet(kernels, work / "fleet") as fleet:
        inventory = fleet.inventory(work / "inventory.ini")
        t0 = time.monotonic()
        r = subprocess.run([str(bin_dir / "ansible-playbook"), "-i", str(inventory),
                            "livesplice.fleet.setup", "-e",
                            f"livesplice_wheelhouse={sysimage.wheelhouse()}"],
                           env=env, capture_output=True, text=True)
        setup = time.monotonic() - t0
        assert r.returncode == 0, r.stdout[-3000:]
        summary = work / "summary.json"
        t0 = time.monotonic()
        r = subprocess.run([str(bin_dir / "ansible-playbook"), "-i", str(inventory),
                            "livesplice.fleet.rollout", "-e", f"livesplice_package={package}",
                            "-e", "livesplice_batch=2", "-e", f"livesplice_summary_file={summary}"],
                           env=env, capture_output=True, text=True)
        rollout = time.monotonic() - t0
        assert r.returncode == 0, r.stdout[-3000:]
        result = json.loads(summary.read_text())
        problems = [p for g in fleet.guests for p in g.session.dmesg_problems()]
    return {"setup": setup, "rollout": rollout, "hosts": len(kernels),
            "updated": result["updated"], "pause_ms": result["pause_ms"], "problems": problems}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="boots per figure")
    ap.add_argument("--skip-fleet", action="store_true")
    args = ap.parse_args()
    files = debian.fetch_kernel(KERNEL)
    load = os.getloadavg()[0]
    print(f"machine: {platform.node()}, {os.cpu_count()} cpus, load average {load:.1f}; guests "
          f"{KERNEL} under QEMU/TCG booting the Debian 12 system image; {args.runs} boots each, medians")
    with tempfile.TemporaryDirectory(prefix="livesplice-bench-reboot-") as tmp:
        work = Path(tmp)
        packages = make_packages(files, work)
        boot_figures = bench_boot(args.runs, work, packages)
        base = statistics.median(boot_figures[0]["userspace"])
        print(f"no update installed: the unit skipped (condition), userspace boot {base:.2f} s")
        for count in (1, 5):
            f = boot_figures[count]
            print(f"{count} installed: `apply --all` at boot {statistics.median(f['unit']):.2f} s "
                  f"(runs {', '.join(f'{x:.2f}' for x in f['unit'])}); userspace boot "
                  f"{statistics.median(f['userspace']):.2f} s")
        print(f"kernel log problems: {len(boot_figures['problems'])}")
        if not args.skip_fleet:
            fl = bench_fleet(work, packages[0])
            print(f"fleet: setup role (livesplice from the wheelhouse into {fl['hosts']} guests) "
                  f"{fl['setup']:.1f} s; rollout of one update over {fl['hosts']} guests "
                  f"{fl['rollout']:.1f} s, {fl['rollout'] / fl['hosts']:.1f} s per host; updated "
                  f"{fl['updated']}, pauses {fl['pause_ms']} ms; kernel log problems "
                  f"{len(fl['problems'])}")


if __name__ == "__main__":
    main()
