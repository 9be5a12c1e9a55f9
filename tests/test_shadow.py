"""Shadow data (livesplice.h) on the stock 6.1.0-53-amd64 kernel in the VM: an update attaches a
counter to an existing object (init_uts_ns) and shows it in /proc/version; an update stacked on
it sees the same counter, which outlives both of them: the core stays loaded while shadow data
exist, with no update applied, until an update frees it. The kernel log is checked."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, assert_clean, create_packages, create_stacked_package, guest_cli, mark

pytestmark = pytest.mark.vm

INCLUDE = ("#include <linux/utsname.h>\n", "#include <linux/utsname.h>\n#include <livesplice.h>\n")
BANNER = "\tseq_printf(m, linux_proc_banner,"
COUNTER = ("\tatomic_t *reads = livesplice_shadow_get_or_alloc(&init_uts_ns, 1, sizeof(*reads),"
           " GFP_KERNEL);\n"
           "\n\tif (reads)\n\t\tseq_printf(m, \"livesplice-%s reads=%%d\\n\", "
           "atomic_inc_return(reads));\n")
# A counts the reads of /proc/version in shadow data of init_uts_ns ...
SHADOW_A = {"fs/proc/version.c": [INCLUDE, (BANNER, COUNTER % "a" + BANNER)]}
# ... B, stacked on A, shows the same counter under its own name ...
SHADOW_B = {"fs/proc/version.c": [("livesplice-a reads", "livesplice-b reads")]}
# An unrelated update: PR_SET_DUMPABLE also rejects a stray third argument.
PRCTL = {"kernel/sys.c": [("if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {",
                           "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")]}
# ... and C, made from the stock source, frees it.
SHADOW_C = {"fs/proc/version.c": [INCLUDE, (BANNER, "\tlivesplice_shadow_free(&init_uts_ns, 1);\n"
                                            "\tseq_puts(m, \"livesplice-c freed\\n\");\n" + BANNER)]}


@pytest.fixture(scope="module")
def packages(stock_kernel, vm, tmp_path_factory):
    made = create_packages(stock_kernel, vm.exchange, {"shadow-a": SHADOW_A, "shadow-c": SHADOW_C,
                                                         "unrelated": PRCTL})
    made["shadow-b"] = create_stacked_package(
        stock_kernel, vm.exchange, tmp_path_factory.mktemp("tree-a") / "linux", SHADOW_A,
        SHADOW_B, "shadow-b")
    return made


def version(vm) -> str:
    return vm.run(["cat", "/proc/version"], check=True).out


def core_loaded(vm) -> bool:
    return vm.run(["test", "-d", "/sys/module/livesplice_core"]).status == 0


def test_shadow_data_outlives_its_updates_and_keeps_the_core(vm, packages):
    since = mark(vm)
    r = guest_cli(vm, "apply", str(packages["shadow-a"]))
    assert r.status == 0, r.err
    assert "livesplice-a reads=1" in version(vm) and "livesplice-a reads=2" in version(vm)
    r = guest_cli(vm, "apply", str(packages["shadow-b"]))
    assert r.status == 0, r.err
    assert "livesplice-b reads=3" in version(vm)  # the same data, seen by the stacked update
    assert guest_cli(vm, "undo", "shadow-b").status == 0
    assert "livesplice-a reads=4" in version(vm)
    assert guest_cli(vm, "undo", "shadow-a").status == 0
    assert "reads=" not in version(vm)  # the stock code again
    # No update applied, and the core stays: it holds the counter.
    assert guest_cli(vm, "list").out.strip() == ""
    assert core_loaded(vm)
    held = vm.run([sys.executable, "-c", "from livesplice import coreproto; "
                   "print(coreproto.shadow_in_use())"], cwd=str(REPO)).out
    assert held.strip() == "1", held
    # Nor is it unloaded as an idle leftover.
    assert guest_cli(vm, "cleanup").out.strip() == "nothing to clean up"
    assert core_loaded(vm)

    r = guest_cli(vm, "apply", str(packages["shadow-c"]))
    assert r.status == 0, r.err
    assert "livesplice-c freed" in version(vm)
    assert guest_cli(vm, "undo", "shadow-c").status == 0
    assert not core_loaded(vm)  # nothing holds it now
    log = vm.dmesg().splitlines()[since:]
    assert not [line for line in log if "no symbol version" in line or "disagrees" in line], log
    assert_clean(vm, since)


# In the guest: 50 applies and undos of the unrelated update, from one process (the library, as
# the CLI calls it), while the load runs; then the counter's next two values.
CYCLES = """
import sys
from livesplice import apply as a
for i in range(50):
    a.apply(a.Path(sys.argv[1]), retries=20, retry_delay=0.05)
    a.undo("unrelated", retries=20, retry_delay=0.05)
print("cycles done")
"""
# Load: two readers of /proc/version (the shadow counter's users) and a busy loop of prctl calls
# (the unrelated update's function), detached from the agent, named for pkill.
LOAD = """
import ctypes, os
for _ in range(2):
    if os.fork() == 0:
        while True:
            open("/proc/version").read()
libc = ctypes.CDLL(None)
while True:
    libc.prctl(4, 1, 0, 0, 0)
"""


def reads(vm) -> int:
    line = next(line for line in version(vm).splitlines() if "reads=" in line)
    return int(line.rsplit("reads=", 1)[1])


def test_a_shadow_field_survives_50_cycles_of_an_unrelated_update_under_load(vm, packages):
    since = mark(vm)
    assert guest_cli(vm, "apply", str(packages["shadow-a"])).status == 0
    first = reads(vm)
    vm.run(["sh", "-c", 'setsid python3 -c "$1" livesplice-load >/dev/null 2>&1 </dev/null &',
            "sh", LOAD], check=True)
    try:
        r = vm.run([sys.executable, "-c", CYCLES, str(packages["unrelated"])], cwd=str(REPO),
                   timeout=900)
        assert r.status == 0 and "cycles done" in r.out, r.err[-3000:]
    finally:
        vm.run("pkill -f livesplice-load; sleep 0.2; true")
    # the field lived on: the same counter, only higher, in the same shadow data
    later = reads(vm)
    assert later > first + 1 and reads(vm) == later + 1
    held = vm.run([sys.executable, "-c", "from livesplice import coreproto; "
                   "print(coreproto.shadow_in_use())"], cwd=str(REPO)).out
    assert held.strip() == "1", held
    assert [u["id"] for u in json.loads(guest_cli(vm, "list", "--json").out)] == ["shadow-a"]
    assert guest_cli(vm, "undo", "shadow-a").status == 0
    r = guest_cli(vm, "apply", str(packages["shadow-c"]))  # its read frees it: the core can go
    assert r.status == 0 and "livesplice-c freed" in version(vm)
    assert guest_cli(vm, "undo", "shadow-c").status == 0
    assert not core_loaded(vm)
    assert_clean(vm, since)
