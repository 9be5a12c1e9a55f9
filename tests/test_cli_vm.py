"""The command line on the stock 6.1.0-53-amd64 kernel in the VM: apply --dry-run, the shared
shape of list and view, completion of applied ids, the journal, and `vm run` whose guest dies."""

import json
import textwrap

import pytest
from conftest import (
    GUEST_CLI,
    REPO,
    applied,
    create_packages,
    create_stacked_package,
    guest_cli,
    livesplice_cli,
)

from livesplice.errors import EXIT_GUEST_DIED
from livesplice.testbed import Session

pytestmark = pytest.mark.vm

DUMPABLE_CHECK = "if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {"
# PR_SET_DUMPABLE also rejects a stray third argument (tests/test_apply.py's first update) ...
PRCTL_A = {"kernel/sys.c": [(DUMPABLE_CHECK,
                             "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")]}
# ... and, stacked on it, a stray fourth one.
PRCTL_B = {"kernel/sys.c": [("|| arg3) {", "|| arg3 || arg4) {")]}


@pytest.fixture(scope="module")
def packages(stock_kernel, vm, tmp_path_factory):
    made = create_packages(stock_kernel, vm.exchange, {"prctl-a": PRCTL_A})
    # B is made from a tree that already has A.
    made["prctl-b"] = create_stacked_package(
        stock_kernel, vm.exchange, tmp_path_factory.mktemp("tree-a") / "linux", PRCTL_A, PRCTL_B,
        "prctl-b")
    return made


def mark(vm) -> int:
    return len(vm.dmesg().splitlines())


def new_kernel_log(vm, since: int) -> list[str]:
    return vm.dmesg().splitlines()[since:]


def loaded_modules(vm) -> list[str]:
    return sorted(line.split()[0] for line in vm.run(["cat", "/proc/modules"], check=True).out.splitlines())


def kallsyms_address(vm, name: str) -> int:
    line = vm.run(["grep", f" {name}$", "/proc/kallsyms"], check=True).out.split()
    return int(line[0], 16)


def test_dry_run_checks_and_loads_nothing(vm, packages):
    since = mark(vm)
    modules, tainted = loaded_modules(vm), vm.run(["cat", "/proc/sys/kernel/tainted"]).out
    lsmod = vm.run(["lsmod"], check=True).out
    r = guest_cli(vm, "apply", "--dry-run", str(packages["prctl-a"]), "--json")
    assert r.status == 0, r.err
    plan = json.loads(r.out)
    assert plan["format"] == 1 and plan["dry_run"] is True and plan["id"] == "prctl-a"
    assert plan["functions"] == ["__do_sys_prctl"]
    assert plan["would_load"] == ["livesplice_core", plan["module"]] and plan["would_unload"] == []
    [jump] = plan["jumps"]
    function = kallsyms_address(vm, "__do_sys_prctl")
    assert function <= int(jump["site"], 16) < function + 16  # after the fentry call
    assert int(jump["runs"], 16) == function and len(bytes.fromhex(jump["expect"])) == 5
    # The new code's references resolved to the running kernel's symbols (per-cpu ones are
    # offsets): for a name kallsyms has once, its address.
    kallsyms: dict[str, list[int]] = {}
    for line in vm.run(["cat", "/proc/kallsyms"], check=True).out.splitlines():
        address, _, name = line.split()[:3]
        kallsyms.setdefault(name, []).append(int(address, 16))
    assert plan["kernel_refs"]
    for ref in plan["kernel_refs"]:
        assert int(ref["address"], 16) in kallsyms[ref["name"]], ref
    # Nothing loaded, nothing written, nothing in the kernel's log, the kernel not tainted.
    assert loaded_modules(vm) == modules and vm.run(["lsmod"], check=True).out == lsmod
    assert vm.run(["test", "-e", "/sys/module/livesplice_core"]).status == 1
    assert vm.run(["cat", "/proc/sys/kernel/tainted"]).out == tainted
    assert not [line for line in new_kernel_log(vm, since) if "livesplice" in line or "taint" in line]
    assert not vm.dmesg_problems(since)
    assert applied(vm) == []
    r = guest_cli(vm, "apply", "--dry-run", str(packages["prctl-a"]))
    assert r.status == 0 and "dry run: prctl-a would apply: __do_sys_prctl" in r.out
    assert "nothing was loaded" in r.out and loaded_modules(vm) == modules

    # The real apply writes the jump where the dry run said.
    r = guest_cli(vm, "apply", str(packages["prctl-a"]), "--json")
    assert r.status == 0, r.err
    assert json.loads(r.out)["dry_run"] is False
    view = json.loads(guest_cli(vm, "view", "prctl-a", "--json").out)
    assert view["jumps"][0]["site"] == jump["site"]
    assert guest_cli(vm, "undo", "prctl-a").status == 0
    assert not vm.dmesg_problems(since)


def test_dry_run_refuses_as_apply_does(vm, packages):
    """prctl-b's pre code is prctl-a's new code: without prctl-a it does not match this kernel.
    The dry run says so with apply's exit status, error and reasons."""
    since = mark(vm)
    modules = loaded_modules(vm)
    dry = guest_cli(vm, "apply", "--dry-run", str(packages["prctl-b"]), "--json")
    real = guest_cli(vm, "apply", str(packages["prctl-b"]), "--json")
    assert dry.status == real.status == 3, (dry.out, real.out)
    dry_error, real_error = json.loads(dry.out), json.loads(real.out)
    assert dry_error == real_error
    assert "run-pre matching failed" in dry_error["error"] and dry_error["status"] == 3
    assert any("__do_sys_prctl (kernel/sys.o) does not match" in r for r in dry_error["reasons"])
    assert loaded_modules(vm) == modules and applied(vm) == []
    assert not vm.dmesg_problems(since)


def test_dry_run_stacked_and_already_applied(vm, packages):
    since = mark(vm)
    assert guest_cli(vm, "apply", str(packages["prctl-a"])).status == 0
    try:
        # Applied already: apply's "nothing to do", from the dry run too.
        assert guest_cli(vm, "apply", str(packages["prctl-a"])).status == 4
        r = guest_cli(vm, "apply", "--dry-run", str(packages["prctl-a"]), "--json")
        assert r.status == 4 and "already applied" in json.loads(r.out)["error"]
        # B stacks on A: it matches A's new code, and needs no core loaded.
        modules = loaded_modules(vm)
        r = guest_cli(vm, "apply", "--dry-run", str(packages["prctl-b"]), "--json")
        assert r.status == 0, r.err
        plan = json.loads(r.out)
        a = json.loads(guest_cli(vm, "view", "prctl-a", "--json").out)["jumps"][0]
        assert plan["would_load"] == [plan["module"]]
        assert plan["jumps"][0]["site"] == a["site"] and plan["jumps"][0]["runs"] == a["new"]
        assert loaded_modules(vm) == modules and applied(vm) == ["prctl-a"]
    finally:
        assert guest_cli(vm, "undo", "prctl-a").status == 0
    assert not vm.dmesg_problems(since)


LEAVE_MODULE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from livesplice import apply, kernel
    # What an apply killed after loading its new code leaves: the module, linked, not switched.
    plan = apply.check_apply(apply.read_package(Path(sys.argv[1])), [], [])
    kernel.insmod(plan.module, plan.new_code)
    print(plan.module)
""")


def test_dry_run_counts_what_cleanup_would_unload(vm, packages):
    since = mark(vm)
    r = vm.run([GUEST_CLI[0], "-c", LEAVE_MODULE, str(packages["prctl-a"])], cwd=str(REPO))
    assert r.status == 0, r.err
    module = r.out.strip()
    assert module in loaded_modules(vm)
    r = guest_cli(vm, "apply", "--dry-run", str(packages["prctl-a"]), "--json")
    assert r.status == 0, r.err
    plan = json.loads(r.out)
    assert plan["would_unload"] == [module]
    assert plan["would_load"] == ["livesplice_core", module]
    assert module in loaded_modules(vm)  # the dry run left it
    r = guest_cli(vm, "cleanup", "--json")
    assert r.status == 0 and json.loads(r.out) == {"removed": [module], "format": 1}
    assert not any(m.startswith("livesplice") for m in loaded_modules(vm))
    assert not vm.dmesg_problems(since)


def test_list_and_view_share_one_shape(vm, packages):
    since = mark(vm)
    assert guest_cli(vm, "apply", str(packages["prctl-a"])).status == 0
    try:
        listed = json.loads(guest_cli(vm, "list", "--json").out)
        every = json.loads(guest_cli(vm, "view", "--json").out)
        one = json.loads(guest_cli(vm, "view", "prctl-a", "--json").out)
        assert listed == every
        [record] = listed
        assert set(record) == {"id", "module", "functions", "pause_ns", "work_ns", "overridden", "jumps",
                               "targets", "format"}
        assert record["targets"] == [{"name": "vmlinux", "state": "patched"}]
        assert {k: one[k] for k in record} == record
        assert set(one) - set(record) == {"patch", "target"}
        assert record["functions"] == ["__do_sys_prctl"] and record["pause_ns"] > 0
        assert record["jumps"][0]["name"] == "__do_sys_prctl"
        assert record["overridden"] == []
        assert "arg3" in one["patch"] and one["target"]["release"] == "6.1.0-53-amd64"
        # And as text: names, in stacking order.
        assert guest_cli(vm, "list").out.split("\t")[0] == "prctl-a"
    finally:
        assert guest_cli(vm, "undo", "prctl-a").status == 0
    assert not vm.dmesg_problems(since)


def complete_in_guest(vm, words: str, *prefix: str) -> list[str]:
    r = vm.run([*prefix, *GUEST_CLI], cwd=str(REPO),
               env={"_LIVESPLICE_COMPLETE": "bash_complete", "COMP_WORDS": words,
                    "COMP_CWORD": str(len(words.split(" ")) - 1)})
    assert r.status == 0 and r.err == "", r.err
    return [line for line in r.out.splitlines() if line]


def test_completion_of_applied_ids(vm, packages):
    assert complete_in_guest(vm, "livesplice undo ") == []
    assert guest_cli(vm, "apply", str(packages["prctl-a"])).status == 0
    try:
        assert complete_in_guest(vm, "livesplice undo ") == ["plain,prctl-a"]
        assert complete_in_guest(vm, "livesplice undo x") == []
        assert complete_in_guest(vm, "livesplice view pr") == ["plain,prctl-a", "file,pr"]
        # A user who cannot read the core's state gets no ids, and no error.
        nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        assert complete_in_guest(vm, "livesplice undo ", *nobody) == []
    finally:
        assert guest_cli(vm, "undo", "prctl-a").status == 0


LISTENER = textwrap.dedent("""
    import socket, sys
    # Stands where journald's syslog socket is on a systemd machine (the guest has none).
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/dev/log")
    with open(sys.argv[1], "ab", buffering=0) as out:
        while True:
            out.write(sock.recv(65536) + b"\\n")
""")


def test_apply_and_undo_are_recorded_in_the_journal(vm, packages):
    (vm.exchange / "listener.py").write_text(LISTENER)
    vm.run(f"{GUEST_CLI[0]} {vm.exchange}/listener.py /run/journal.log > /dev/null 2>&1 & "
           "echo $! > /run/listener", check=True)
    try:
        vm.run("for i in $(seq 100); do [ -S /dev/log ] && exit 0; sleep 0.1; done; exit 1", check=True)
        assert guest_cli(vm, "apply", "--dry-run", str(packages["prctl-a"])).status == 0
        assert guest_cli(vm, "apply", str(packages["prctl-a"])).status == 0
        assert guest_cli(vm, "undo", "prctl-a").status == 0
        assert guest_cli(vm, "apply", str(packages["prctl-b"])).status == 3
        records = vm.run(["cat", "/run/journal.log"], check=True).out.splitlines()
    finally:
        vm.run("kill $(cat /run/listener); rm -f /dev/log")
    # No record of the dry run: it changed nothing.
    assert len(records) == 3, records
    assert records[0].startswith("<14>livesplice[")  # user.info
    assert (f"]: applied update prctl-a from {packages['prctl-a']} (unsigned): __do_sys_prctl; "
            "the machine stopped ") in records[0]
    assert records[1].startswith("<14>livesplice[") and "]: undone update prctl-a;" in records[1]
    assert records[2].startswith("<11>livesplice[")  # user.err
    assert (f"]: apply of {packages['prctl-b']} failed (exit status 3): run-pre matching failed"
            in records[2])


def test_lockdown_refuses_the_dry_run_too(stock_kernel, packages, vm):
    with Session(kernel=stock_kernel.kernel.abi, rwdirs=[str(vm.exchange)],
                 append="lockdown=integrity") as guest:
        r = guest.run([*GUEST_CLI, "apply", "--dry-run", str(packages["prctl-a"]), "--json"],
                      cwd=str(REPO), timeout=300)
        assert r.status == 3, r.err
        assert "locked down (integrity)" in json.loads(r.out)["error"]
        assert "livesplice" not in guest.run(["cat", "/proc/modules"]).out
        assert not guest.dmesg_problems()


def test_vm_run_whose_guest_panics(stock_kernel):
    """The guest kernel dies: the end of its console on stderr, exit status 5."""
    proc = livesplice_cli("vm", "run", "--", "sh", "-c", "echo c > /proc/sysrq-trigger")
    assert proc.returncode == EXIT_GUEST_DIED == 5, proc.stderr
    assert proc.stdout == ""
    assert "guest kernel panicked running ['sh', '-c', 'echo c > /proc/sysrq-trigger']" in proc.stderr
    assert "--- guest console (last lines) ---" in proc.stderr
    assert "Kernel panic - not syncing: sysrq triggered crash" in proc.stderr
