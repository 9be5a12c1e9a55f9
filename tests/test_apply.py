"""apply, undo, list and view in the VM, on the stock 6.1.0-53-amd64 kernel."""

import json
import subprocess
import textwrap

import pytest
from conftest import GUEST_CLI, REPO, applied, edit_patch, guest_cli, livesplice_cli

from livesplice import debian
from livesplice.testbed import Session

VERSION = "6.1.187-1"
DUMPABLE_CHECK = "if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {"
# The article's Listing 1 in today's code: PR_SET_DUMPABLE also rejects a stray third argument.
PRCTL_A = {"kernel/sys.c": [(DUMPABLE_CHECK,
                             "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")]}
# Stacked on PRCTL_A: and a stray fourth one.
PRCTL_B = {"kernel/sys.c": [("|| arg3) {", "|| arg3 || arg4) {")]}
# Several functions: a static function (set_one_prio), an .isra clone (do_sysinfo.isra.0), and a
# syscall with a .cold part (__x64_sys_gethostname; x86-64 has no gethostname system call, so its
# effect is not observed, only that it is switched and back).
SEVERAL = {"kernel/sys.c": [
    ("info->procs = nr_threads;", "info->procs = nr_threads + 1000;"),
    ("\tif (len < 0)\n\t\treturn -EINVAL;\n\tdown_read(&uts_sem);\n\tu = utsname();\n\ti = 1 + strlen(u->nodename);",
     "\tif (len <= 0)\n\t\treturn -EINVAL;\n\tdown_read(&uts_sem);\n\tu = utsname();\n\ti = 1 + strlen(u->nodename);"),
    ("\tif (niceval < task_nice(p) && !can_nice(p, niceval)) {\n\t\terror = -EACCES;",
     "\tif (niceval < task_nice(p) && !can_nice(p, niceval)) {\n\t\terror = -EPERM;"),
]}
# A function every sleeping `sleep` has on its stack.
NANOSLEEP = {"kernel/time/hrtimer.c": [
    ("\tstruct restart_block *restart;\n\n\tdo {\n\t\tset_current_state(TASK_INTERRUPTIBLE|TASK_FREEZABLE);",
     "\tstruct restart_block *restart;\n\n\tasm volatile(\"nop\");\n\tdo {\n\t\tset_current_state(TASK_INTERRUPTIBLE|TASK_FREEZABLE);")]}

PROBE = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    def call(*args):
        r = libc.syscall(*args)
        return 0 if r >= 0 else -ctypes.get_errno()
    info = ctypes.create_string_buffer(256)
    libc.sysinfo(info)
    procs = int.from_bytes(info.raw[80:82], "little")
    print(f"dumpable_arg3={call(157, 4, 1, 1, 0, 0)} dumpable_arg4={call(157, 4, 1, 0, 1, 0)} "
          f"procs_over_1000={procs >= 1000}")
""")


@pytest.fixture(scope="module")
def packages(stock_kernel, vm, tmp_path_factory):
    """Packages built on the host, into the exchange directory the guest sees."""
    source = stock_kernel.source_tree
    out = vm.exchange
    made = {}

    def create(name, edits, tree=source, *extra):
        (out / f"{name}.patch").write_text(edit_patch(tree, edits))
        proc = livesplice_cli("create", "--source", str(tree), "--config", str(stock_kernel.config),
                              "--patch", str(out / f"{name}.patch"), "--id", name,
                              "-o", str(out / f"{name}.tar.gz"), *extra)
        assert proc.returncode == 0, proc.stderr
        made[name] = out / f"{name}.tar.gz"

    create("prctl-a", PRCTL_A)
    create("several", SEVERAL)
    create("nanosleep", NANOSLEEP)
    # B is made from a tree that already has A: a copy (hard links, then sys.c written anew).
    tree_a = tmp_path_factory.mktemp("tree-a") / "linux"
    subprocess.run(["cp", "-al", str(source), str(tree_a)], check=True)
    sysc = tree_a / "kernel" / "sys.c"
    text = sysc.read_text().replace(PRCTL_A["kernel/sys.c"][0][0], PRCTL_A["kernel/sys.c"][0][1])
    sysc.unlink()
    sysc.write_text(text)
    create("prctl-b", PRCTL_B, tree_a)
    return made


def probe(vm) -> dict:
    out = vm.run(["python3", "-c", PROBE], check=True).out
    return {k: v for k, v in (item.split("=") for item in out.split())}


def assert_clean(vm, since: int) -> None:
    problems = vm.dmesg_problems(since)
    assert not problems, problems


def dmesg_mark(vm) -> int:
    return len(vm.dmesg().splitlines())


def test_prctl_before_after_undo(vm, packages):
    mark = dmesg_mark(vm)
    assert probe(vm)["dumpable_arg3"] == "0"
    r = guest_cli(vm, "apply", str(packages["prctl-a"]), "--json")
    assert r.status == 0, r.err
    result = json.loads(r.out)
    assert result["functions"] == ["__do_sys_prctl"] and result["pause_ns"] > 0
    assert probe(vm)["dumpable_arg3"] == "-22"
    assert applied(vm) == ["prctl-a"]
    view = json.loads(guest_cli(vm, "view", "prctl-a", "--json").out)
    assert view["functions"] == ["__do_sys_prctl"] and "arg3" in view["patch"]
    assert guest_cli(vm, "apply", str(packages["prctl-a"])).status == 4  # already applied
    r = guest_cli(vm, "undo", "prctl-a")
    assert r.status == 0, r.err
    assert probe(vm)["dumpable_arg3"] == "0"
    assert applied(vm) == []
    assert "livesplice" not in vm.run(["cat", "/proc/modules"]).out  # helpers unloaded
    assert_clean(vm, mark)


def nice_error(vm) -> str:
    """What an unprivileged `nice -n -5` is told: set_one_prio's refusal."""
    r = vm.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "nice", "-n", "-5",
                "true"])
    return r.err.strip().rsplit(":", 1)[-1].strip()


def test_several_functions(vm, packages):
    mark = dmesg_mark(vm)
    before = probe(vm)
    assert before["procs_over_1000"] == "False"
    assert nice_error(vm) == "Permission denied"  # EACCES
    r = guest_cli(vm, "apply", str(packages["several"]), "--json")
    assert r.status == 0, r.err
    names = set(json.loads(r.out)["functions"])
    assert {"do_sysinfo.isra.0", "__x64_sys_gethostname", "set_one_prio"} <= names
    assert probe(vm)["procs_over_1000"] == "True"
    assert nice_error(vm) == "Operation not permitted"  # EPERM
    assert guest_cli(vm, "undo", "several").status == 0
    assert probe(vm) == before
    assert nice_error(vm) == "Permission denied"
    assert_clean(vm, mark)


def test_stacked_updates_and_undo_order(vm, packages):
    mark = dmesg_mark(vm)
    assert guest_cli(vm, "apply", str(packages["prctl-a"])).status == 0
    r = guest_cli(vm, "apply", str(packages["prctl-b"]))
    assert r.status == 0, r.err
    assert applied(vm) == ["prctl-a", "prctl-b"]
    assert probe(vm)["dumpable_arg4"] == "-22"
    r = guest_cli(vm, "undo", "prctl-a")
    assert r.status == 3 and "prctl-b stacks on prctl-a" in r.err
    assert probe(vm)["dumpable_arg4"] == "-22"
    assert guest_cli(vm, "undo", "prctl-b").status == 0
    p = probe(vm)
    assert (p["dumpable_arg3"], p["dumpable_arg4"]) == ("-22", "0")
    assert guest_cli(vm, "undo", "prctl-a").status == 0
    assert probe(vm)["dumpable_arg3"] == "0"
    # B's pre code is A's new code: without A it does not match the running kernel.
    r = guest_cli(vm, "apply", str(packages["prctl-b"]))
    assert r.status == 3 and "run-pre matching failed" in r.err
    assert applied(vm) == []
    assert_clean(vm, mark)


def test_sleeper_in_replaced_code_is_moved(vm, packages):
    """A `sleep` inside do_nanosleep is parked at its return to user space (the core's busy
    check finds it at the first try), its nanosleep restarts in the new code with the time it
    had left, and undo moves it back the same way. (A task that cannot be moved gives up with
    "code busy": tests/test_safety_core.py.)"""
    mark = dmesg_mark(vm)
    vm.run("sleep 1000 > /dev/null 2>&1 & echo $! > /run/sleeper", check=True)
    r = guest_cli(vm, "apply", str(packages["nanosleep"]), "--retries", "3", "--retry-delay", "0.2",
                  "--json")
    assert r.status == 0, r.err
    assert json.loads(r.out)["attempts"] >= 2
    assert vm.run("kill -0 $(cat /run/sleeper)").status == 0
    assert vm.run(["sleep", "0.1"]).status == 0
    r = guest_cli(vm, "undo", "nanosleep", "--retries", "3", "--retry-delay", "0.2")
    assert r.status == 0, r.err
    assert vm.run("kill -0 $(cat /run/sleeper)").status == 0
    vm.run("kill $(cat /run/sleeper)", check=True)
    assert applied(vm) == [] and "livesplice" not in vm.run(["cat", "/proc/modules"]).out
    assert_clean(vm, mark)


LOAD = textwrap.dedent("""
    import ctypes, os, sys, time
    from livesplice.apply import apply, undo
    libc = ctypes.CDLL(None, use_errno=True)
    pids = []
    for cpu in range(2):
        pid = os.fork()
        if pid == 0:
            os.sched_setaffinity(0, {cpu})
            os.nice(10)  # keep both vCPUs calling, but let apply and undo be scheduled
            counts = {}
            while not os.path.exists("/run/stop-load"):
                r = libc.syscall(157, 4, 1, 1, 0, 0)
                e = 0 if r >= 0 else ctypes.get_errno()
                counts[e] = counts.get(e, 0) + 1
            with open(f"/run/load-{cpu}", "w") as f:
                f.write(repr(counts))
            os._exit(0)
        pids.append(pid)
    try:
        for i in range(int(sys.argv[2])):
            t = time.time()
            apply(sys.argv[1], retries=50, retry_delay=0.02)
            undo("prctl-a", retries=50, retry_delay=0.02)
            print(f"cycle {i}: {time.time() - t:.2f} s", file=sys.stderr, flush=True)
    finally:
        open("/run/stop-load", "w").close()
        for pid in pids:
            os.waitpid(pid, 0)
    print(open("/run/load-0").read())
    print(open("/run/load-1").read())
""")


CYCLES = int(__import__("os").environ.get("LIVESPLICE_LOAD_CYCLES", "50"))


def test_apply_undo_under_load(vm, packages):
    mark = dmesg_mark(vm)
    vm.run(["rm", "-f", "/run/stop-load"], check=True)
    r = vm.run([GUEST_CLI[0], "-c", LOAD, str(packages["prctl-a"]), str(CYCLES)], timeout=1800,
               cwd=str(REPO))
    assert r.status == 0, r.err
    counts = [__import__("ast").literal_eval(line) for line in r.out.splitlines() if line]
    for c in counts:  # every call answered by the old code (0) or the new one (EINVAL)
        assert set(c) <= {0, 22} and c.get(0, 0) > 0
    assert any(c.get(22, 0) > 0 for c in counts)
    assert applied(vm) == []
    assert_clean(vm, mark)


def test_bad_inputs_change_nothing(vm, packages, tmp_path):
    mark = dmesg_mark(vm)
    damaged = vm.exchange / "damaged.tar.gz"
    data = bytearray(packages["prctl-a"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    r = guest_cli(vm, "apply", str(damaged))
    assert r.status == 2 and "damaged package" in r.err
    r = guest_cli(vm, "apply", str(vm.exchange / "missing.tar.gz"))
    assert r.status == 2 and "not found" in r.err
    r = guest_cli(vm, "undo", "no-such-update")
    assert r.status == 2 and "no applied update 'no-such-update'" in r.err
    r = vm.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *GUEST_CLI,
                "apply", str(packages["prctl-a"])], cwd=str(REPO))
    assert r.status == 2 and "run it as root" in r.err
    assert applied(vm) == [] and "livesplice" not in vm.run(["cat", "/proc/modules"]).out
    assert probe(vm)["dumpable_arg3"] == "0"
    assert_clean(vm, mark)


def test_package_for_another_kernel_is_refused(vm, packages):
    """A package made from 6.1.190-1 (for 6.1.0-54-amd64) on the 6.1.187-1 kernel: the release
    check refuses it; with that check bypassed, run-pre matching does, before anything is
    written. prctl_set_auxv differs between the two (its memcpy length)."""
    mark = dmesg_mark(vm)
    newer = debian.fetch_kernel("6.1.0-54-amd64")
    edits = {"kernel/sys.c": [("\tif (len > sizeof(user_auxv))\n\t\treturn -EINVAL;",
                               "\tif (!len || len > sizeof(user_auxv))\n\t\treturn -EINVAL;")]}
    patch = vm.exchange / "auxv.patch"
    patch.write_text(edit_patch(newer.source_tree, edits))
    out = vm.exchange / "auxv-190.tar.gz"
    proc = livesplice_cli("create", "--debian-version", "6.1.190-1", "--patch", str(patch),
                          "--id", "auxv-190", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["target"]["release"] == "6.1.0-54-amd64"
    r = guest_cli(vm, "apply", str(out))
    assert r.status == 2 and "is for kernel 6.1.0-54-amd64; this kernel is 6.1.0-53-amd64" in r.err
    r = vm.run([*GUEST_CLI, "apply", str(out)], cwd=str(REPO),
               env={"LIVESPLICE_UNSAFE_SKIP_TARGET_CHECK": "1"})
    assert r.status == 3, r.err
    assert "run-pre matching failed" in r.err and "prctl_set_auxv (kernel/sys.o) does not match" in r.err
    assert "offset 0x" in r.err
    assert applied(vm) == [] and "livesplice" not in vm.run(["cat", "/proc/modules"]).out
    assert_clean(vm, mark)


def test_state_comes_from_the_kernel_and_reboot_clears_it(stock_kernel, packages, vm):
    """`list` reads the core module's state: true for a new process, empty after a reboot."""
    with Session(kernel=stock_kernel.kernel.abi, rwdirs=[str(vm.exchange)]) as other:
        assert guest_cli(other, "apply", str(packages["prctl-a"])).status == 0
        other.run(["rm", "-rf", "/run/livesplice"], check=True)  # the tool's own files gone
        assert applied(other) == ["prctl-a"]
        assert "__do_sys_prctl" in guest_cli(other, "view").out
    with Session(kernel=stock_kernel.kernel.abi) as rebooted:
        assert applied(rebooted) == []
