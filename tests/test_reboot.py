"""Installed updates survive a reboot: a real Debian 12 system (systemd as PID 1, its own disk;
sysimage) boots the stock 6.1.0-53-amd64 kernel again and again on the same disk. livesplice is
installed in it from a wheel, as an administrator would; the boot service applies the installed
updates early at boot, `livesplice.disable=1` keeps it off, and a failing update is logged and
does not stop the boot. An installed update of a module that is not loaded at boot (zram) is
armed by the boot service and patches the module when it loads. Each boot's kernel log is
checked."""

from __future__ import annotations

import json

import pytest
from conftest import create_packages, create_stacked_package

from livesplice import sysimage
from livesplice.testbed import Session

pytestmark = pytest.mark.vm

DUMPABLE_CHECK = "if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {"
# PR_SET_DUMPABLE also rejects a stray third argument ...
PRCTL_A = {"kernel/sys.c": [(DUMPABLE_CHECK,
                             "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")]}
# ... and, stacked on it, a stray fourth one.
PRCTL_B = {"kernel/sys.c": [("|| arg3) {", "|| arg3 || arg4) {")]}
# prctl(PR_SET_DUMPABLE, 1, arg3, arg4): 0 on the stock kernel, -1 (EINVAL) once fixed.
# zram's max_comp_streams shows the CPU count + 1000 (a module no device loads at boot).
ZRAM = {"drivers/block/zram/zram_drv.c": [
    ('return scnprintf(buf, PAGE_SIZE, "%d\\n", num_online_cpus());',
     'return scnprintf(buf, PAGE_SIZE, "%d\\n", num_online_cpus() + 1000);')]}
STREAMS = "/sys/block/zram0/max_comp_streams"
PRCTL = ("import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
         "print(libc.prctl(4, 1, int(sys.argv[1]), int(sys.argv[2]), 0))")


@pytest.fixture(scope="module")
def setup(stock_kernel, tmp_path_factory):
    exchange = tmp_path_factory.mktemp("exchange")
    made = create_packages(stock_kernel, exchange, {"prctl-a": PRCTL_A, "zram": ZRAM})
    made["prctl-b"] = create_stacked_package(
        stock_kernel, exchange, tmp_path_factory.mktemp("tree-a") / "linux", PRCTL_A, PRCTL_B,
        "prctl-b")
    disk = sysimage.new_disk(tmp_path_factory.mktemp("disk") / "system.qcow2")
    return {"packages": made, "disk": disk, "wheels": sysimage.wheelhouse(), "exchange": exchange}


def boot(setup, append: str = "") -> Session:
    session = Session(kernel="6.1.0-53-amd64", disk=setup["disk"], append=append,
                      rwdirs=[str(setup["exchange"]), str(setup["wheels"])], boot_timeout=300)
    session.start()
    state = session.run(["systemctl", "is-system-running", "--wait"], timeout=240).out.strip()
    session.system_state = state
    return session


def shutdown(session: Session) -> None:
    problems = session.dmesg_problems()
    session.close()
    assert not problems, problems


def livesplice(session: Session, *args: str, timeout: float = 300):
    return session.run([f"{sysimage.VENV}/bin/livesplice", *args], timeout=timeout)


def prctl(session: Session, arg3: int, arg4: int = 0) -> int:
    return int(session.run(["python3", "-c", PRCTL, str(arg3), str(arg4)], check=True).out)


def applied(session: Session) -> list[str]:
    r = livesplice(session, "list", "--json")
    assert r.status == 0, r.err
    return [u["id"] for u in json.loads(r.out)]


def unit(session: Session, *props: str) -> dict:
    out = session.run(["systemctl", "show", "livesplice.service", *(f"-p{p}" for p in props)],
                      check=True).out
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_installed_updates_come_back_at_every_boot(setup):
    a, b = setup["packages"]["prctl-a"], setup["packages"]["prctl-b"]

    # First boot: livesplice installed from its wheel, the boot service, A installed and applied
    # now, B (stacked on A) installed only.
    s = boot(setup)
    try:
        assert s.system_state == "running", s.system_state
        sysimage.install_livesplice(s, setup["wheels"])
        r = livesplice(s, "service", "install", "--json")
        assert r.status == 0, r.err
        assert prctl(s, 1) == 0
        r = livesplice(s, "install", str(a), "--json")
        assert r.status == 0, r.err
        assert json.loads(r.out)["state"] == "applied"
        assert prctl(s, 1) == -1  # live
        r = livesplice(s, "install", "--no-apply", str(b), "--json")
        assert r.status == 0 and json.loads(r.out)["state"] == "installed", r.out + r.err
        assert applied(s) == ["prctl-a"] and prctl(s, 0, 1) == 0
        listed = json.loads(livesplice(s, "list", "--installed", "--json").out)
        assert [(i["id"], i["applied"]) for i in listed] == [("prctl-a", True), ("prctl-b", False)]
        # zram, not loaded: installed and applied, its target waiting for the module
        r = livesplice(s, "install", str(setup["packages"]["zram"]), "--json")
        assert r.status == 0 and json.loads(r.out)["state"] == "applied", r.out + r.err
    finally:
        shutdown(s)

    # Second boot: the service applied both, in order, before the system was up.
    s = boot(setup)
    try:
        assert s.system_state == "running", s.system_state
        assert applied(s) == ["prctl-a", "prctl-b", "zram"]
        assert prctl(s, 1) == -1 and prctl(s, 0, 1) == -1  # observed, not only listed
        # zram's update was armed at boot: the module is patched as it loads
        assert s.run(["modprobe", "zram"]).status == 0
        cpus = int(s.run(["nproc"], check=True).out)
        assert int(s.run(["cat", STREAMS], check=True).out) == cpus + 1000
        zram = [u for u in json.loads(livesplice(s, "list", "--json").out) if u["id"] == "zram"]
        assert [t["state"] for t in zram[0]["targets"]] == ["patched"], zram
        props = unit(s, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "active", "Result": "success", "ExecMainStatus": "0"}, props
        # It ran before the network and sysinit.target's successors.
        order = s.run(["systemctl", "list-dependencies", "--after", "--plain", "network-pre.target"],
                      check=True).out
        assert "livesplice.service" in order
        journal = s.run(["journalctl", "-b", "-o", "cat", "-t", "livesplice"], check=True).out
        assert "applied update prctl-a" in journal and "applied update prctl-b" in journal
        # apply --all again: nothing to do
        assert livesplice(s, "apply", "--all").status == 4
    finally:
        shutdown(s)

    # Third boot, with livesplice.disable=1: nothing applied; the stock code runs.
    s = boot(setup, append="livesplice.disable=1")
    try:
        assert applied(s) == [] and prctl(s, 1) == 0
        props = unit(s, "ConditionResult", "ActiveState")
        assert props == {"ConditionResult": "no", "ActiveState": "inactive"}, props
        # A left installed alone: B, whose pre code is A's, cannot apply at the next boot.
        r = livesplice(s, "uninstall", "prctl-a", "--json")
        assert r.status == 0 and json.loads(r.out)["undo"] is None, r.out + r.err
    finally:
        shutdown(s)

    # Fourth boot: B is refused (run-pre matching) and logged; the boot goes on, degraded.
    s = boot(setup)
    try:
        assert s.system_state == "degraded", s.system_state
        assert applied(s) == ["zram"] and prctl(s, 0, 1) == 0  # the others still applied
        props = unit(s, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "3"}, props
        journal = s.run(["journalctl", "-b", "-o", "cat", "-u", "livesplice.service"],
                        check=True).out
        assert "prctl-b" in journal and "run-pre matching" in journal, journal
        r = livesplice(s, "uninstall", "prctl-b")
        assert r.status == 0, r.err
        assert livesplice(s, "apply", "--all").status == 4
        assert livesplice(s, "list", "--installed", "--json").out.strip().startswith("[")
    finally:
        shutdown(s)
