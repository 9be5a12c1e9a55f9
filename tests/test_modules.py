"""Module targets (issue 11), on the stock 6.1.0-53-amd64 kernel in the VM: a fix to a module's
functions, observable from user space through sysfs, with the module loaded before the apply,
loaded only after it, unloaded and loaded again while applied; one package for vmlinux and a
module together; a module whose code is not the package's, refused at apply or at its load; a
kernel thread inside a module function being replaced. The kernel log is checked each time."""

import base64
import json

import pytest
from conftest import assert_clean, create_packages, create_stacked_package, guest_cli, log_since, mark

from livesplice.package import Package

pytestmark = pytest.mark.vm

ZRAM_FILE = "drivers/block/zram/zram_drv.c"
# max_comp_streams shows the CPU count + 1000; disksize its value + 7, read under a static mutex
# of zram's own (a field of the new code the core links into the module, wherever it loads), and
# once the device is set up, + 1000 while zsmalloc (another module, zram's dependency) says its
# pool has no pages: a call the core links to zsmalloc's zs_get_total_pages.
ZRAM = {ZRAM_FILE: [
    ('return scnprintf(buf, PAGE_SIZE, "%d\\n", num_online_cpus());',
     'return scnprintf(buf, PAGE_SIZE, "%d\\n", num_online_cpus() + 1000);'),
    ('\tstruct zram *zram = dev_to_zram(dev);\n\n\treturn scnprintf(buf, PAGE_SIZE, "%llu\\n", '
     'zram->disksize);',
     '\tstruct zram *zram = dev_to_zram(dev);\n\tu64 size;\n\n\tmutex_lock(&zram_index_mutex);\n'
     '\tsize = zram->disksize + 7;\n'
     '\tif (init_done(zram))\n'
     '\t\tsize += 1000 * !zs_get_total_pages(zram->mem_pool);\n'
     '\tmutex_unlock(&zram_index_mutex);\n'
     '\treturn scnprintf(buf, PAGE_SIZE, "%llu\\n", size);'),
    # (a pr_debug in a function the stacked zram-b leaves alone: a stacked update's pre code
    # that uses the older update's own copy of a descriptor is refused, docs/module-targets.md)
    ('\tsz = zcomp_available_show(zram->compressor, buf);\n',
     '\tsz = zcomp_available_show(zram->compressor, buf);\n'
     '\tpr_debug("livesplice test: comp_algorithm read\\n");\n')]}
# prctl(PR_SET_DUMPABLE, 1, 1) fails with EINVAL (vmlinux), together with the zram change.
PRCTL = ("if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {",
         "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")
BOTH = {ZRAM_FILE: ZRAM[ZRAM_FILE][:1], "kernel/sys.c": [PRCTL]}
# jbd2's journal thread lives in kjournald2's loop: a kernel thread always inside the code.
JOURNAL = {"fs/jbd2/journal.c": [("loop:\n\tif (journal->j_flags & JBD2_UNMOUNT)",
                                  "loop:\n\tasm volatile(\"nop\");\n"
                                  "\tif (journal->j_flags & JBD2_UNMOUNT)")]}

STREAMS = "/sys/block/zram0/max_comp_streams"
DISKSIZE = "/sys/block/zram0/disksize"
REFUSE = "/sys/module/livesplice_core/parameters/refuse_mismatch"
DUMPABLE = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
            "print(libc.prctl(4, 1, 1, 0, 0), ctypes.get_errno())")


# Stacked on ZRAM: made from a tree that has it, max_comp_streams shows + 2000 and disksize + 8.
# Its disksize_show's pre code is ZRAM's new code, whose fields the core links (zram's mutex):
# at zram's load they are checked after ZRAM's are written.
ZRAM_B = {ZRAM_FILE: [("num_online_cpus() + 1000);", "num_online_cpus() + 2000);"),
                      ("size = zram->disksize + 7;", "size = zram->disksize + 8;")]}


@pytest.fixture(scope="module")
def packages(stock_kernel, vm, tmp_path_factory):
    made = create_packages(stock_kernel, vm.exchange, {"zram": ZRAM, "both": BOTH,
                                                        "journal": JOURNAL})
    made["zram-other"] = other_build(made["zram"], vm.exchange / "zram-other.tar.gz")
    made["zram-b"] = create_stacked_package(
        stock_kernel, vm.exchange, tmp_path_factory.mktemp("tree-zram") / "linux", ZRAM, ZRAM_B,
        "zram-b")
    return made


def other_build(path, out):
    """The zram package (same id) with one byte of disksize_show's pre code changed, outside every
    relocated field and run-time patched site: what a package made from another build of the
    module looks like to the checks."""
    package = Package.read(path)
    record = next(f for f in package.pre.functions if f.name == "disksize_show")
    covered = bytearray(record.size)
    for m in record.masks:
        covered[m.offset:m.offset + m.length] = b"\1" * m.length
    for r in record.relocs:
        covered[r.offset:r.offset + r.width] = b"\1" * r.width
    code = bytearray(record.data())
    at = next(i for i in range(8, record.size) if not covered[i])
    code[at] ^= 0x40
    record.code = base64.b64encode(bytes(code)).decode()
    package.write(out)
    return out


@pytest.fixture(autouse=True)
def clean_state(vm):
    """Each test starts with nothing applied, zram unloaded and the core's default policy."""
    yield
    for update in json.loads(guest_cli(vm, "list", "--json").out or "[]")[::-1]:
        guest_cli(vm, "undo", update["id"])
    vm.run("rmmod zram 2>/dev/null; true")


def read(vm, path: str) -> str:
    return vm.run(["cat", path], check=True).out.strip()


def zram_loaded(vm) -> bool:
    return vm.run(["test", "-d", "/sys/module/zram"]).status == 0


def modprobe_zram(vm):
    return vm.run(["modprobe", "zram", "num_devices=1"])


def targets(vm, update_id: str) -> dict[str, str]:
    view = json.loads(guest_cli(vm, "view", update_id, "--json").out)
    return {t["name"]: t["state"] for t in view["targets"]}


def test_loaded_module_before_after_undo(vm, packages):
    since = mark(vm)
    assert modprobe_zram(vm).status == 0
    cpus = read(vm, STREAMS)
    assert read(vm, DISKSIZE) == "0"
    r = guest_cli(vm, "apply", str(packages["zram"]), "--dry-run", "--json")
    assert r.status == 0, r.err
    dry = json.loads(r.out)
    assert [t["state"] for t in dry["targets"]] == ["would patch"]
    assert {j["name"] for j in dry["jumps"]} == {"disksize_show", "max_comp_streams_show",
                                                    "comp_algorithm_show"}
    r = guest_cli(vm, "apply", str(packages["zram"]), "--json")
    assert r.status == 0, r.err
    result = json.loads(r.out)
    assert set(result["functions"]) == {"disksize_show", "max_comp_streams_show", "comp_algorithm_show"}
    assert result["targets"] == [{"name": "zram", "build_id": result["targets"][0]["build_id"],
                                  "state": "patched"}]
    assert read(vm, STREAMS) == str(int(cpus) + 1000)
    assert read(vm, DISKSIZE) == "7"  # through zram's own mutex, linked by the core
    vm.run(f"echo 1M > {DISKSIZE}", check=True)  # the device is set up: zsmalloc's pool made
    assert read(vm, DISKSIZE) == str((1 << 20) + 7 + 1000)  # zsmalloc called, an empty pool
    vm.run("echo 1 > /sys/block/zram0/reset", check=True)
    # The new code's pr_debug() has a dynamic debug descriptor of its own, in the update's module.
    vm.run("mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug; "
           "echo 'module livesplice_zram +p' > /sys/kernel/debug/dynamic_debug/control",
           check=True)
    read(vm, "/sys/block/zram0/comp_algorithm")
    assert "livesplice test: comp_algorithm read" in log_since(vm, since)
    listed = json.loads(guest_cli(vm, "list", "--json").out)
    assert listed[0]["targets"] == [{"name": "zram", "state": "patched"}]
    assert {j["name"] for j in listed[0]["jumps"]} == {"disksize_show", "max_comp_streams_show",
                                                       "comp_algorithm_show"}
    r = guest_cli(vm, "undo", "zram")
    assert r.status == 0, r.err
    assert read(vm, STREAMS) == cpus and read(vm, DISKSIZE) == "0"
    assert "livesplice" not in vm.run(["cat", "/proc/modules"]).out
    assert_clean(vm, since)


def test_module_loaded_after_apply_and_reloaded(vm, packages):
    since = mark(vm)
    vm.run("rmmod zram 2>/dev/null; true")
    r = guest_cli(vm, "apply", str(packages["zram"]), "--dry-run", "--json")
    assert r.status == 0, r.err
    assert [t["state"] for t in json.loads(r.out)["targets"]] == ["would wait"]
    r = guest_cli(vm, "apply", str(packages["zram"]), "--json")
    assert r.status == 0, r.err
    assert json.loads(r.out)["targets"][0]["state"] == "waiting"
    assert targets(vm, "zram") == {"zram": "waiting"}
    assert modprobe_zram(vm).status == 0
    cpus = vm.run(["nproc"], check=True).out.strip()
    assert read(vm, STREAMS) == str(int(cpus) + 1000)
    assert read(vm, DISKSIZE) == "7"
    assert "livesplice: update zram: patched zram (3 functions)" in log_since(vm, since)
    assert targets(vm, "zram") == {"zram": "patched"}
    # Unloaded, the update waits again; loaded again (at another address), patched again.
    assert vm.run(["rmmod", "zram"]).status == 0
    assert targets(vm, "zram") == {"zram": "waiting"}
    assert modprobe_zram(vm).status == 0
    assert read(vm, STREAMS) == str(int(cpus) + 1000) and read(vm, DISKSIZE) == "7"
    assert targets(vm, "zram") == {"zram": "patched"}
    r = guest_cli(vm, "undo", "zram")
    assert r.status == 0, r.err
    assert read(vm, STREAMS) == cpus
    vm.run(["rmmod", "zram"], check=True)
    assert modprobe_zram(vm).status == 0  # nothing waits for it any more
    assert read(vm, STREAMS) == cpus
    assert_clean(vm, since)


def test_vmlinux_and_module_in_one_package(vm, packages):
    since = mark(vm)
    assert modprobe_zram(vm).status == 0
    cpus = read(vm, STREAMS)
    assert vm.run(["python3", "-c", DUMPABLE], check=True).out.split() == ["0", "0"]
    r = guest_cli(vm, "apply", str(packages["both"]), "--json")
    assert r.status == 0, r.err
    assert {t["name"]: t["state"] for t in json.loads(r.out)["targets"]} == \
        {"vmlinux": "patched", "zram": "patched"}
    assert read(vm, STREAMS) == str(int(cpus) + 1000)
    assert vm.run(["python3", "-c", DUMPABLE], check=True).out.split() == ["-1", "22"]
    r = guest_cli(vm, "undo", "both")
    assert r.status == 0, r.err
    assert read(vm, STREAMS) == cpus
    assert vm.run(["python3", "-c", DUMPABLE], check=True).out.split() == ["0", "0"]
    assert_clean(vm, since)


def test_other_build_refused_at_apply(vm, packages):
    since = mark(vm)
    assert modprobe_zram(vm).status == 0
    r = guest_cli(vm, "apply", str(packages["zram-other"]))
    assert r.status == 3, r.err
    assert "disksize_show" in r.err and "does not match" in r.err
    assert "livesplice" not in vm.run(["cat", "/proc/modules"]).out
    assert read(vm, DISKSIZE) == "0"
    assert_clean(vm, since)


def test_other_build_refused_at_load(vm, packages):
    since = mark(vm)
    vm.run("rmmod zram 2>/dev/null; true")
    r = guest_cli(vm, "apply", str(packages["zram-other"]), "--json")
    assert r.status == 0, r.err  # nothing loaded to check: it waits
    assert modprobe_zram(vm).status != 0
    assert not zram_loaded(vm)
    log = log_since(vm, since)
    assert "livesplice: update zram: refusing to load zram: " in log  # (its id is zram's)
    assert "disksize_show" in log
    # The documented way out: load it unpatched.
    vm.run(f"echo 0 > {REFUSE}", check=True)
    try:
        assert modprobe_zram(vm).status == 0
    finally:
        vm.run(f"echo 1 > {REFUSE}", check=True)
    assert "livesplice: update zram: zram loads unpatched: " in log_since(vm, since)
    assert read(vm, DISKSIZE) == "0"
    assert targets(vm, "zram") == {"zram": "waiting"}
    assert guest_cli(vm, "undo", "zram").status == 0
    assert_clean(vm, since)


def test_thread_inside_a_module_function_is_busy(vm, packages):
    """A mounted ext4 file system's journal thread is always in jbd2's kjournald2."""
    since = mark(vm)
    vm.run("modprobe loop && modprobe ext4 && truncate -s 16M /tmp/ls-ext4.img && "
           "mkfs.ext4 -q -F /tmp/ls-ext4.img && mkdir -p /tmp/ls-ext4 && "
           "mount -o loop /tmp/ls-ext4.img /tmp/ls-ext4", check=True)
    try:
        r = guest_cli(vm, "apply", str(packages["journal"]), "--retries", "2",
                      "--retry-delay", "0.2")
    finally:
        vm.run("umount /tmp/ls-ext4; rm -f /tmp/ls-ext4.img", check=True)
    assert r.status == 3, r.err
    assert "code busy: kjournald2 in use by jbd2/loop" in r.err and "kernel thread" in r.err
    assert "livesplice" not in vm.run(["cat", "/proc/modules"]).out
    assert_clean(vm, since)


def test_stacked_module_updates(vm, packages):
    """zram-b replaces what zram replaced: applied on top, patched in that order when the module
    loads again, undone in reverse order only."""
    since = mark(vm)
    assert modprobe_zram(vm).status == 0
    cpus = int(read(vm, STREAMS))
    assert guest_cli(vm, "apply", str(packages["zram"])).status == 0
    r = guest_cli(vm, "apply", str(packages["zram-b"]))
    assert r.status == 0, r.err
    assert read(vm, STREAMS) == str(cpus + 2000)
    assert read(vm, DISKSIZE) == "8"
    vm.run(["rmmod", "zram"], check=True)
    r = modprobe_zram(vm)
    assert r.status == 0, log_since(vm, since)
    assert read(vm, STREAMS) == str(cpus + 2000) and read(vm, DISKSIZE) == "8"
    assert targets(vm, "zram") == {"zram": "patched"} and targets(vm, "zram-b") == {"zram": "patched"}
    r = guest_cli(vm, "undo", "zram")
    assert r.status == 3 and "zram-b" in r.err, r.err
    assert guest_cli(vm, "undo", "zram-b").status == 0
    assert read(vm, STREAMS) == str(cpus + 1000) and read(vm, DISKSIZE) == "7"
    assert guest_cli(vm, "undo", "zram").status == 0
    assert read(vm, STREAMS) == str(cpus)
    # Both applied while zram is not loaded: at its load zram's held fields (zeros until then)
    # are written before zram-b's check reads them.
    vm.run(["rmmod", "zram"], check=True)
    assert guest_cli(vm, "apply", str(packages["zram"])).status == 0
    r = guest_cli(vm, "apply", str(packages["zram-b"]))
    assert r.status == 0, r.err
    r = modprobe_zram(vm)
    assert r.status == 0, log_since(vm, since)
    assert read(vm, STREAMS) == str(cpus + 2000) and read(vm, DISKSIZE) == "8"
    assert targets(vm, "zram") == {"zram": "patched"} and targets(vm, "zram-b") == {"zram": "patched"}
    assert guest_cli(vm, "undo", "zram-b").status == 0
    assert guest_cli(vm, "undo", "zram").status == 0
    assert_clean(vm, since)


def test_update_module_removed_by_force(vm, packages):
    """`rmmod -f` of an applied update's own module (MODULE_FORCE_UNLOAD ignores the core's
    reference): the core switches the update back while the module's code is still there and
    forgets it; zram runs its old code and `list` no longer shows the update."""
    since = mark(vm)
    assert modprobe_zram(vm).status == 0
    cpus = read(vm, STREAMS)
    r = guest_cli(vm, "apply", str(packages["zram"]), "--json")
    assert r.status == 0, r.err
    module = json.loads(r.out)["module"]
    assert read(vm, STREAMS) == str(int(cpus) + 1000)
    r = vm.run(["rmmod", "-f", module])
    assert r.status == 0, r.err
    assert read(vm, STREAMS) == cpus and read(vm, DISKSIZE) == "0"
    assert json.loads(guest_cli(vm, "list", "--json").out) == []
    assert (f"livesplice: update zram: its module {module} is being removed by force: switched back"
            in log_since(vm, since))
    assert guest_cli(vm, "cleanup").status == 0
    assert "livesplice" not in vm.run(["cat", "/proc/modules"]).out
    assert_clean(vm, since)
