"""Updates on the 6.12 line (issue 12), on stock 6.12.111+deb12-amd64 in the VM (whatever
`--kernel` says), as QEMU's `-cpu max` (no call thunks) and as Skylake-Client with call depth
tracking (`spectre_v2=retpoline retbleed=stuff`: call thunks in the padding before functions,
direct calls redirected into them): a function whose ENDBR was sealed at boot, one that keeps its
ENDBR, a notrace function without either (and an update stacked on it), a function reached
through its call padding, new code that takes the address of a sealed function (refused), and
module targets. Each test looks at the running code in /proc/kcore and checks the kernel log."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest
from conftest import (
    REPO,
    applied,
    assert_clean,
    create_packages,
    create_stacked_package,
    guest_cli,
    log_since,
    mark,
    nothing_loaded,
)

from livesplice import debian
from livesplice.package import Package
from livesplice.testbed import Session

pytestmark = pytest.mark.vm

KERNEL = "6.12.111+deb12-amd64"
ENDBR, SEALED = "f30f1efa", "660f1f00"  # endbr64; the 4-byte NOP apply_seal_endbr() writes
FENTRY_NOP = "0f1f440000"
JMP = "e9"

SETUPS = {
    "cpu-max": ("max", "", "Not affected"),
    "skylake-stuff": ("Skylake-Client", "spectre_v2=retpoline retbleed=stuff",
                      "Mitigation: Stuffing"),
}

# set_dumpable (fs/exec.c) is called directly only (prctl, exec, commit_creds): vmlinux never
# takes its address, so its ENDBR is sealed. The pr_info goes on the line it replaces: the
# functions below keep their __LINE__s.
SET_MASK = "\tset_mask_bits(&mm->flags, MMF_DUMPABLE_MASK, value);"
DUMPABLE_PRINT = {"fs/exec.c": [(SET_MASK, '\tpr_info("livesplice-612: set_dumpable(%d) by %s\\n", '
                                           "value, current->comm); " + SET_MASK.lstrip())]}
# The same function telling who called it: the return address of the call into its padding.
DUMPABLE_CALLER = {"fs/exec.c": [(SET_MASK, '\tpr_info("livesplice-612: set_dumpable called, '
                                            'returns to %px\\n", __builtin_return_address(0)); '
                                  + SET_MASK.lstrip())]}
# version_proc_show is a seq_file show function (its address is taken): it keeps its ENDBR.
VERSION = {"fs/proc/version.c": [("\tseq_printf(m, linux_proc_banner,",
                                  '\tseq_puts(m, "livesplice "); seq_printf(m, linux_proc_banner,')]}
# __do_sys_prctl is notrace (no fentry) and only called directly (no ENDBR): the jump at +0.
DUMPABLE_CHECK = "if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {"
PRCTL_A = {"kernel/sys.c": [(DUMPABLE_CHECK,
                             "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")]}
PRCTL_B = {"kernel/sys.c": [("|| arg3) {", "|| arg3 || arg4) {")]}
# prctl(PR_SET_DUMPABLE) calls set_dumpable through a pointer: the new code takes its address.
IBT = {"kernel/sys.c": [("\t\tset_dumpable(me->mm, arg2);\n\t\tbreak;",
                         "\t\t{ void (*fn)(struct mm_struct *, int) = set_dumpable; "
                         "OPTIMIZER_HIDE_VAR(fn); fn(me->mm, arg2); }\n\t\tbreak;")]}
# Module targets: zram (not loaded at boot) shows max_comp_streams + 1000; overlay (loaded at
# boot: the guest's root is an overlay) reports a name length + 1000 in statfs.
ZRAM = {"drivers/block/zram/zram_drv.c": [
    ('return scnprintf(buf, PAGE_SIZE, "%d\\n", num_online_cpus());',
     'return scnprintf(buf, PAGE_SIZE, "%d\\n", num_online_cpus() + 1000);')]}
OVL = {"fs/overlayfs/super.c": [("\t\tbuf->f_namelen = ofs->namelen;",
                                 "\t\tbuf->f_namelen = ofs->namelen + 1000;")]}

# The running code as the guest reads it (/proc/kcore): for each name, its address, the 16
# bytes of padding before it and its first 16 bytes; with --calls CALLER TARGET [MODULE SIZE],
# the direct calls (e8) in CALLER (vmlinux's, or the SIZE bytes of MODULE's) whose destination
# is TARGET or inside its padding, and where they go relative to TARGET.
READ_CODE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, %r)
    from livesplice.kernel import Kallsyms, KernelMemory
    ks, mem = Kallsyms(), KernelMemory()
    if sys.argv[1] == "--calls":
        target = ks.address(sys.argv[3])
        if len(sys.argv) > 4:
            caller = ks.lookup(sys.argv[2], sys.argv[4])[0].address
            code = mem.read(caller, int(sys.argv[5]))
        else:
            caller = ks.address(sys.argv[2])
            code = mem.read(caller, ks.next_text_after(caller) - caller)
        calls = []
        for i in range(len(code) - 4):
            if code[i] == 0xe8:
                dest = caller + i + 5 + int.from_bytes(code[i + 1:i + 5], "little", signed=True)
                if target - 16 <= dest <= target:
                    calls.append([caller + i, dest - target])
        print(json.dumps({"target": target, "calls": calls}))
    else:
        print(json.dumps({name: [ks.address(name), mem.read(ks.address(name) - 16, 16).hex(),
                                 mem.read(ks.address(name), 16).hex()] for name in sys.argv[1:]}))
""") % str(REPO)

# prctl(PR_SET_DUMPABLE) as a process named ls612-dump: arg2 0 then 1, then 1 with a stray arg3
# and with a stray arg4: their results (0 or -errno).
DUMPABLE = textwrap.dedent("""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, b"ls612-dump", 0, 0, 0)  # PR_SET_NAME
    def prctl(*args):
        return 0 if libc.prctl(*args) >= 0 else -ctypes.get_errno()
    print(prctl(4, 0, 0, 0, 0), prctl(4, 1, 0, 0, 0), prctl(4, 1, 1, 0, 0), prctl(4, 1, 0, 1, 0))
""")


@pytest.fixture(scope="module")
def kernel_612() -> debian.KernelFiles:
    return debian.fetch_kernel(KERNEL)


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    return tmp_path_factory.mktemp("exchange-612")


@pytest.fixture(scope="module")
def packages(kernel_612, exchange, tmp_path_factory):
    """Made once, on the host, for both set-ups."""
    made = create_packages(kernel_612, exchange, {
        "dumpable-print": DUMPABLE_PRINT, "dumpable-caller": DUMPABLE_CALLER, "version": VERSION,
        "prctl-a": PRCTL_A, "ibt": IBT, "zram": ZRAM, "ovl": OVL})
    made["prctl-b"] = create_stacked_package(
        kernel_612, exchange, tmp_path_factory.mktemp("tree-prctl-612") / "linux", PRCTL_A,
        PRCTL_B, "prctl-b")
    return made


@pytest.fixture(scope="module", params=list(SETUPS))
def vm(request, kernel_612, exchange):
    """One booted guest per set-up; `vm.setup` names it."""
    cpu, append, retbleed = SETUPS[request.param]
    with Session(kernel=KERNEL, cpu=cpu, append=append, rwdirs=[str(exchange)]) as session:
        session.setup = request.param
        assert session.run(["uname", "-r"], check=True).out.strip() == KERNEL
        assert session.run(["cat", "/sys/devices/system/cpu/vulnerabilities/retbleed"],
                           check=True).out.strip() == retbleed
        yield session
        problems = session.dmesg_problems()
    assert not problems, "kernel log reports problems:\n" + "\n".join(problems)


@pytest.fixture(autouse=True)
def nothing_left_applied(vm):
    """A failing test leaves nothing applied, and zram unloaded, for the next one."""
    yield
    for update in reversed(applied(vm)):
        guest_cli(vm, "undo", update)
    vm.run("rmmod zram 2>/dev/null; true")


def code(vm, *names: str) -> dict[str, tuple[int, str, str]]:
    """name -> (address, padding, first 16 bytes), read from the guest's /proc/kcore."""
    r = vm.run([sys.executable, "-c", READ_CODE, *names], check=True)
    return {name: tuple(v) for name, v in json.loads(r.out).items()}


def apply(vm, package) -> dict:
    r = guest_cli(vm, "apply", str(package), "--json")
    assert r.status == 0, r.err
    return json.loads(r.out)


def undo(vm, update: str) -> None:
    r = guest_cli(vm, "undo", update)
    assert r.status == 0, r.err


def calls(vm, caller: str, target: str, module_size: tuple[str, int] | None = None
          ) -> dict[int, int]:
    """The direct calls from caller to target (or its padding): call site -> where it goes,
    relative to target."""
    extra = [module_size[0], str(module_size[1])] if module_size else []
    r = vm.run([sys.executable, "-c", READ_CODE, "--calls", caller, target, *extra], check=True)
    return {site: offset for site, offset in json.loads(r.out)["calls"]}


def assert_through_padding(vm, sites: dict[int, int]) -> None:
    """With call depth tracking every call goes to the function's call thunk, in its padding
    (vmlinux's calls patched at boot, a module's at its load); without, to the function."""
    assert sites
    if vm.setup == "skylake-stuff":
        assert all(-16 <= offset < 0 for offset in sites.values()), sites
    else:
        assert set(sites.values()) == {0}, sites


def dumpable(vm) -> list[str]:
    """prctl(PR_SET_DUMPABLE, 0), (1), (1, arg3=1), (1, arg4=1): each one's result."""
    return vm.run(["python3", "-c", DUMPABLE], check=True).out.split()


def test_sealed_endbr(vm, packages):
    """set_dumpable starts with a sealed ENDBR, then fentry: the jump goes at +9, the sealed
    NOP and the fentry site stay, and the new code runs (its printk, from a prctl)."""
    since = mark(vm)
    _, pad, entry = code(vm, "set_dumpable")["set_dumpable"]
    assert entry[:18] == SEALED + FENTRY_NOP
    assert dumpable(vm) == ["0", "0", "0", "0"]
    assert "livesplice-612" not in log_since(vm, since)
    result = apply(vm, packages["dumpable-print"])
    assert result["functions"] == ["set_dumpable"]
    _, pad_applied, applied_entry = code(vm, "set_dumpable")["set_dumpable"]
    assert applied_entry[:18] == SEALED + FENTRY_NOP and applied_entry[18:20] == JMP
    assert pad_applied == pad  # the padding (and a call thunk in it) untouched
    dumpable(vm)
    log = log_since(vm, since)
    assert "livesplice-612: set_dumpable(0) by ls612-dump" in log
    assert "livesplice-612: set_dumpable(1) by ls612-dump" in log
    undo(vm, "dumpable-print")
    assert code(vm, "set_dumpable")["set_dumpable"][1:] == (pad, entry)
    after = mark(vm)
    dumpable(vm)
    assert "livesplice-612" not in log_since(vm, after)
    assert nothing_loaded(vm)
    assert_clean(vm, since)


def test_kept_endbr(vm, packages):
    """version_proc_show keeps its ENDBR (a seq_file show function): the jump goes at +9 and the
    ENDBR stays, so indirect calls (the seq_file's) still land on an ENDBR."""
    since = mark(vm)
    _, _, entry = code(vm, "version_proc_show")["version_proc_show"]
    assert entry[:18] == ENDBR + FENTRY_NOP
    banner = vm.run(["cat", "/proc/version"], check=True).out
    assert banner.startswith("Linux version ")
    apply(vm, packages["version"])
    _, _, applied_entry = code(vm, "version_proc_show")["version_proc_show"]
    assert applied_entry[:18] == ENDBR + FENTRY_NOP and applied_entry[18:20] == JMP
    assert vm.run(["cat", "/proc/version"], check=True).out == "livesplice " + banner
    undo(vm, "version")
    assert code(vm, "version_proc_show")["version_proc_show"][2] == entry
    assert vm.run(["cat", "/proc/version"], check=True).out == banner
    assert nothing_loaded(vm)
    assert_clean(vm, since)


def test_notrace_function_and_stacking(vm, packages):
    """__do_sys_prctl has neither ENDBR nor fentry: the jump goes at +0. An update stacked on it
    applies over the first one's code; undo of the first is refused while the second is
    applied."""
    if vm.setup != "cpu-max":  # (each set-up's run of it takes minutes of the suite's 45)
        pytest.skip("nothing in it depends on the CPU model: run on cpu-max only")
    since = mark(vm)
    _, _, entry = code(vm, "__do_sys_prctl")["__do_sys_prctl"]
    assert entry[:8] not in (ENDBR, SEALED) and not entry.startswith(FENTRY_NOP)
    assert dumpable(vm) == ["0", "0", "0", "0"]
    assert apply(vm, packages["prctl-a"])["functions"] == ["__do_sys_prctl"]
    assert code(vm, "__do_sys_prctl")["__do_sys_prctl"][2][:2] == JMP
    # the new code's own call to set_dumpable goes through its call thunk, as vmlinux's do
    new_size = Package.read(packages["prctl-a"]).manifest.replaced[0].new_size
    assert_through_padding(vm, calls(vm, "__do_sys_prctl", "set_dumpable",
                                     ("livesplice_prctl_a", new_size)))
    assert dumpable(vm) == ["0", "0", "-22", "0"]
    assert apply(vm, packages["prctl-b"])["functions"] == ["__do_sys_prctl"]
    assert applied(vm) == ["prctl-a", "prctl-b"]
    assert dumpable(vm) == ["0", "0", "-22", "-22"]
    r = guest_cli(vm, "undo", "prctl-a")
    assert r.status == 3 and "prctl-b stacks on prctl-a" in r.err, r.err
    assert dumpable(vm) == ["0", "0", "-22", "-22"]
    undo(vm, "prctl-b")
    assert dumpable(vm) == ["0", "0", "-22", "0"]
    undo(vm, "prctl-a")
    assert dumpable(vm) == ["0", "0", "0", "0"]
    assert code(vm, "__do_sys_prctl")["__do_sys_prctl"][2] == entry
    assert nothing_loaded(vm)
    assert_clean(vm, since)


def test_reached_through_call_padding(vm, packages):
    """With call depth tracking, __do_sys_prctl's direct call to set_dumpable goes to a call
    thunk in set_dumpable's padding, which falls through into the function: the new code runs
    when called that way (it prints its return address: right after that very call)."""
    since = mark(vm)
    sites = calls(vm, "__do_sys_prctl", "set_dumpable")
    assert_through_padding(vm, sites)
    pad = code(vm, "set_dumpable")["set_dumpable"][1]
    # the thunk, where the kernel wrote it (the padding is NOPs without)
    assert (pad != "90" * 16) == (vm.setup == "skylake-stuff")
    apply(vm, packages["dumpable-caller"])
    dumpable(vm)
    returns = {int(a, 16) for a in re.findall(r"livesplice-612: set_dumpable called, returns to "
                                              r"([0-9a-f]{16})", log_since(vm, since))}
    # the prctl's calls came back right after one of the call sites found above
    assert returns & {site + 5 for site in sites}, (returns, sites)
    undo(vm, "dumpable-caller")
    assert nothing_loaded(vm)
    assert_clean(vm, since)


def test_address_of_sealed_function_refused(vm, packages):
    """New code that calls set_dumpable through a pointer: on IBT hardware that indirect call
    would fault (its ENDBR was sealed at boot). apply refuses it, at the dry run as at the real
    one, and nothing is loaded or changed."""
    since = mark(vm)
    before = code(vm, "set_dumpable", "__do_sys_prctl")
    manifest = Package.read(packages["ibt"]).manifest
    assert manifest.kernel.ibt
    taken = {r.name for r in manifest.kernel_refs if r.address_taken}
    # (__do_sys_prctl passes propagate_has_child_subreaper to walk_process_tree, as vmlinux
    # does: it keeps its ENDBR and is not refused)
    assert {"set_dumpable", "propagate_has_child_subreaper"} <= taken
    for dry in (["--dry-run"], []):
        r = guest_cli(vm, "apply", *dry, str(packages["ibt"]))
        assert r.status == 3, (r.status, r.err)
        assert "X86_KERNEL_IBT" in r.err and "set_dumpable" in r.err
        assert "sealed at boot" in r.err and "propagate_has_child_subreaper" not in r.err
        assert nothing_loaded(vm)
    assert code(vm, "set_dumpable", "__do_sys_prctl") == before
    assert dumpable(vm) == ["0", "0", "0", "0"]
    assert "livesplice" not in log_since(vm, since)
    assert_clean(vm, since)


def read(vm, path: str) -> str:
    return vm.run(["cat", path], check=True).out.strip()


def targets(vm, update: str) -> dict[str, str]:
    view = json.loads(guest_cli(vm, "view", update, "--json").out)
    return {t["name"]: t["state"] for t in view["targets"]}


def test_module_targets(vm, packages):
    """zram applied before it loads (patched at its load) and after; overlay, loaded at boot."""
    if vm.setup != "cpu-max":  # (each set-up's run of it takes minutes of the suite's 45)
        pytest.skip("nothing in it depends on the CPU model: run on cpu-max only")
    since = mark(vm)
    streams = "/sys/block/zram0/max_comp_streams"
    assert vm.run(["test", "-d", "/sys/module/zram"]).status != 0
    # before modprobe: the update waits for zram, and the core patches it when it loads
    apply(vm, packages["zram"])
    assert targets(vm, "zram") == {"zram": "waiting"}
    r = vm.run(["modprobe", "zram", "num_devices=1"])
    assert r.status == 0, r.err
    cpus = int(vm.run(["nproc"], check=True).out)
    assert targets(vm, "zram") == {"zram": "patched"}
    assert read(vm, streams) == str(cpus + 1000)
    undo(vm, "zram")
    assert read(vm, streams) == str(cpus)
    vm.run(["rmmod", "zram"], check=True)
    # after modprobe
    assert vm.run(["modprobe", "zram", "num_devices=1"]).status == 0
    assert read(vm, streams) == str(cpus)
    apply(vm, packages["zram"])
    assert targets(vm, "zram") == {"zram": "patched"}
    assert read(vm, streams) == str(cpus + 1000)
    undo(vm, "zram")
    assert read(vm, streams) == str(cpus)
    vm.run(["rmmod", "zram"], check=True)
    # overlay: the guest's root
    namelen = int(vm.run(["stat", "-f", "-c", "%l", "/"], check=True).out)
    apply(vm, packages["ovl"])
    assert targets(vm, "ovl") == {"overlay": "patched"}
    assert int(vm.run(["stat", "-f", "-c", "%l", "/"], check=True).out) == namelen + 1000
    undo(vm, "ovl")
    assert int(vm.run(["stat", "-f", "-c", "%l", "/"], check=True).out) == namelen
    log = log_since(vm, since)
    assert "livesplice: update zram: waiting for zram" in log
    assert "livesplice: update zram: patched zram" in log
    assert nothing_loaded(vm)
    assert_clean(vm, since)
