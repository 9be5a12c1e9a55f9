#!/usr/bin/env python3
"""apply figures, in the VM on the stock kernel: the machine's pause for a 1-function and a
20-function update next to an empty stop_machine() in the same run, and the whole apply time with
run-pre matching's share; the same for a 2-function update of a module target (zram) that is
loaded, and for one that is not: the apply, then the module's load with the core patching it
(`modprobe zram` with and without the update waiting for it); the `livesplice apply` command
from process start to exit, beside the floors it cannot go below in the same guest: starting
Python, importing the command line (`import livesplice.cli`), and the kernel generating
/proc/kallsyms.

Run as root after scripts/setup.sh:  .venv/bin/python bench/apply.py [--runs N]
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from livesplice import debian
from livesplice.create import create
from livesplice.patches import file_patch
from livesplice.testbed import Session

REPO = Path(__file__).resolve().parent.parent
DUMPABLE = "if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {"


def one_function_patch(tree: Path) -> str:
    return unified(tree, "kernel/sys.c", lambda t: t.replace(
        DUMPABLE, "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {"))


def many_functions_patch(tree: Path, syscalls: int) -> str:
    """A nop at the top of the first `syscalls` system calls of kernel/sys.c (each one is a
    __do_sys_ function, or is inlined into its __x64_ and __ia32_ entry points)."""
    def edit(text: str) -> str:
        count = 0

        def add_nop(m):
            nonlocal count
            count += 1
            return m.group(0) + ('\tasm volatile("nop");\n' if count <= syscalls else "")
        return re.sub(r"^SYSCALL_DEFINE\d\([^;{]*\)\n\{\n", add_nop, text, flags=re.MULTILINE)
    return unified(tree, "kernel/sys.c", edit)


ZRAM_SHOW = 'return scnprintf(buf, PAGE_SIZE, "%d\\n", num_online_cpus());'
ZRAM_DISKSIZE = ('\tstruct zram *zram = dev_to_zram(dev);\n\n'
                 '\treturn scnprintf(buf, PAGE_SIZE, "%llu\\n", zram->disksize);')


def module_patch(tree: Path) -> str:
    """Two zram functions (a module): one shows the CPU count + 1000, one reads under a static
    mutex of zram's own (a held field the core links)."""
    return unified(tree, "drivers/block/zram/zram_drv.c", lambda t: t.replace(
        ZRAM_SHOW, ZRAM_SHOW.replace("num_online_cpus()", "num_online_cpus() + 1000")).replace(
        ZRAM_DISKSIZE, ZRAM_DISKSIZE.replace("zram->disksize);", "zram->disksize + 7);")))


def unified(tree: Path, rel: str, edit) -> str:
    text = (tree / rel).read_text()
    return file_patch(rel, text, edit(text))


GUEST = textwrap.dedent("""
    import json, subprocess, sys, time
    from livesplice.apply import apply, undo, empty_pause

    def timed(argv):
        t = time.monotonic()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        return time.monotonic() - t

    one, many, runs, module = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    out = {key: [] for key in ("empty", "one", "many", "python", "cli", "cat_kallsyms",
                               "read_kallsyms", "command", "module", "waiting", "modprobe",
                               "modprobe_patched")}
    subprocess.run("rmmod zram 2>/dev/null; true", shell=True)
    for _ in range(runs):
        out["python"].append(timed([sys.executable, "-c", "pass"]))
        out["cli"].append(timed([sys.executable, "-c", "import livesplice.cli"]))
        out["cat_kallsyms"].append(timed(["cat", "/proc/kallsyms"]))
        t = time.monotonic()
        with open("/proc/kallsyms", "rb") as f:
            kallsyms = f.read()
        out["read_kallsyms"].append(time.monotonic() - t)
        out["kallsyms_lines"] = kallsyms.count(b"\\n")
        out["command"].append(timed([sys.executable, "-m", "livesplice", "apply", one]))
        subprocess.run([sys.executable, "-m", "livesplice", "undo", "bench-one"], check=True,
                       stdout=subprocess.DEVNULL)
        out["empty"].append(empty_pause(one, 20))
        for key, path in (("one", one), ("many", many)):
            t = time.monotonic()
            r = apply(path)
            r["call_seconds"] = time.monotonic() - t
            out[key].append(r)
            undo(r["id"])
        # A module target: loaded (patched at apply), then not loaded (patched at its load).
        out["modprobe"].append(timed(["modprobe", "zram"]))
        t = time.monotonic()
        r = apply(module)
        r["call_seconds"] = time.monotonic() - t
        out["module"].append(r)
        undo(r["id"])
        subprocess.run(["rmmod", "zram"], check=True)
        t = time.monotonic()
        r = apply(module)
        r["call_seconds"] = time.monotonic() - t
        out["waiting"].append(r)
        out["modprobe_patched"].append(timed(["modprobe", "zram"]))
        undo(r["id"])
        subprocess.run(["rmmod", "zram"], check=True)
    print(json.dumps(out))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--syscalls", type=int, default=12)
    args = parser.parse_args()
    files = debian.fetch_kernel(debian.DEFAULT_KERNEL)
    exchange = Path(tempfile.mkdtemp(prefix="bench-apply-", dir=debian.cache_root()))
    one = create(files.source_tree, files.config, one_function_patch(files.source_tree),
                 "bench-one", exchange / "one.tar.gz")
    many = create(files.source_tree, files.config,
                  many_functions_patch(files.source_tree, args.syscalls), "bench-many",
                  exchange / "many.tar.gz")
    n_many = len(many.package.manifest.replaced)
    module = create(files.source_tree, files.config, module_patch(files.source_tree),
                    "bench-module", exchange / "module.tar.gz")
    with Session(rwdirs=[str(exchange)]) as vm:
        r = vm.run([sys.executable, "-c", GUEST, str(one.path), str(many.path), str(args.runs),
                    str(module.path)], timeout=3600, cwd=str(REPO), check=True)
        problems = vm.dmesg_problems()
    data = json.loads(r.out)

    def ms(ns: float) -> float:
        return ns / 1e6

    def med(key: str) -> float:
        return statistics.median(data[key])

    empty = statistics.median(e["mean_ns"] for e in data["empty"])
    print(f"machine: {platform.node()}, {os.cpu_count()} cpus; guest {debian.DEFAULT_KERNEL} "
          f"under QEMU/TCG, 2 vCPUs; {args.runs} runs each, medians")
    print(f"floors in the guest: python start {med('python'):.2f} s; python start and "
          f"`import livesplice.cli` {med('cli'):.2f} s; `cat /proc/kallsyms` "
          f"({data['kallsyms_lines']} lines) {med('cat_kallsyms'):.2f} s, read in Python "
          f"{med('read_kallsyms'):.2f} s")
    print(f"empty stop_machine pause: {ms(empty):.3f} ms")
    for key, label in (("one", "1-function update"), ("many", f"{n_many}-function update"),
                       ("module", "2-function update of a loaded module (zram)"),
                       ("waiting", "the same, zram not loaded (nothing to switch: it waits)")):
        rs = data[key]
        pause = statistics.median(x["pause_ns"] for x in rs)
        work = statistics.median(x["work_ns"] for x in rs)
        total = statistics.median(x["total_seconds"] for x in rs)
        match = statistics.median(x["match_seconds"] for x in rs)
        call = statistics.median(x["call_seconds"] for x in rs)
        print(f"{label}: pause {ms(pause):.3f} ms (stack check and writes {ms(work):.3f} ms); "
              f"whole apply {total:.2f} s, of which run-pre matching {match:.2f} s "
              f"({100 * match / total:.0f}%); with reading and checking the package "
              f"{call:.2f} s")
    print(f"`modprobe zram`: {med('modprobe'):.3f} s alone, {med('modprobe_patched'):.3f} s with "
          "the update waiting for it (the core checks, links and patches it at its load)")
    command, floor = med("command"), med("cli")
    print(f"`livesplice apply`, 1-function update, process start to exit: {command:.2f} s = "
          f"floor (python start and `import livesplice.cli`) {floor:.2f} s + {command - floor:.2f} s")
    print(f"kernel log problems: {len(problems)}")


if __name__ == "__main__":
    main()
