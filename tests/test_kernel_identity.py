"""The target check identifies the running kernel by its build id, not by /proc/version's text,
which an applied update can change (safety issue, item 13). In the VM, on 6.1.0-53-amd64."""


import pytest
from conftest import GUEST_CLI, REPO, applied, create_packages, guest_cli

from livesplice import debian
from livesplice.buildid import elf_build_id, gnu_build_id
from livesplice.package import Package

pytestmark = pytest.mark.vm

# An update to the function behind /proc/version that adds a line to it.
VERSION_LINE = "livesplice-test"
PROC_VERSION = {"fs/proc/version.c": [
    ("\t\tutsname()->version);\n\treturn 0;",
     f"\t\tutsname()->version);\n\tseq_puts(m, \"{VERSION_LINE}\\n\");\n\treturn 0;")]}
# An unrelated one: PR_SET_DUMPABLE also rejects a stray third argument.
PRCTL = {"kernel/sys.c": [("if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {",
                           "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")]}


@pytest.fixture(scope="module")
def packages(stock_kernel, vm):
    return create_packages(stock_kernel, vm.exchange, {"procver": PROC_VERSION, "prctl": PRCTL})


def dmesg_mark(vm) -> int:
    return len(vm.dmesg().splitlines())


def test_image_build_id_is_the_running_kernels(vm, stock_kernel):
    """What create records (from the cached vmlinuz) is what the booted kernel shows; a loaded
    module's build id is its .ko file's."""
    expected = debian.image_build_id(stock_kernel)
    assert expected and len(expected) == 40
    notes = vm.run(["cat", "/sys/kernel/notes"], check=True).stdout
    assert gnu_build_id(notes) == expected
    code = ("from livesplice import kernel; "
            "print(kernel.running_build_id(), kernel.module_build_id('9p'))")
    r = vm.run([GUEST_CLI[0], "-c", code], cwd=str(REPO))
    assert r.status == 0, r.err
    ko = stock_kernel.modules / "kernel" / "fs" / "9p" / "9p.ko"
    assert r.out.split() == [expected, elf_build_id(ko)]


def test_packages_record_the_build_id(stock_kernel, packages):
    for path in packages.values():
        manifest = Package.read(path).manifest
        assert manifest.kernel.build_id == debian.image_build_id(stock_kernel)
        assert manifest.kernel.release == stock_kernel.kernel.abi
        assert [(t.name, t.build_id) for t in manifest.targets] == [
            ("vmlinux", manifest.kernel.build_id)]


def rewrite_target(path, out, build_id):
    package = Package.read(path)
    package.manifest.kernel.build_id = build_id
    package.manifest.target("vmlinux").build_id = build_id
    package.write(out)
    return out


def test_other_build_is_refused_and_old_packages_still_apply(vm, packages, stock_kernel):
    mark = dmesg_mark(vm)
    running = debian.image_build_id(stock_kernel)
    other = rewrite_target(packages["prctl"], vm.exchange / "other.tar.gz", build_id="ab" * 20)
    r = guest_cli(vm, "apply", str(other))
    assert r.status == 2, r.err
    assert (f"is for kernel {stock_kernel.kernel.abi}; this kernel is {stock_kernel.kernel.abi} "
            f"(package: build id {'ab' * 20}; running: build id {running})") in r.err
    # A package without a build id (from before, or for a self-built kernel without vmlinux):
    # the release and version banner as before.
    old = rewrite_target(packages["prctl"], vm.exchange / "old.tar.gz", build_id=None)
    assert Package.read(old).manifest.kernel.build_id is None
    r = guest_cli(vm, "apply", str(old))
    assert r.status == 0, r.err
    assert guest_cli(vm, "undo", "prctl").status == 0
    assert applied(vm) == []
    problems = vm.dmesg_problems(mark)
    assert not problems, problems


def test_update_that_changes_proc_version(vm, packages):
    """Apply an update that adds a line to /proc/version; the same update again is 'already
    applied' (4), an unrelated one still applies (0); undo both."""
    mark = dmesg_mark(vm)
    before = vm.run(["cat", "/proc/version"], check=True).out
    assert VERSION_LINE not in before
    r = guest_cli(vm, "apply", str(packages["procver"]))
    assert r.status == 0, r.err
    after = vm.run(["cat", "/proc/version"], check=True).out
    assert after == before + VERSION_LINE + "\n"

    r = guest_cli(vm, "apply", str(packages["procver"]))
    assert r.status == 4 and "already applied" in r.err, (r.status, r.err)
    r = guest_cli(vm, "apply", str(packages["prctl"]))
    assert r.status == 0, (r.status, r.err)
    assert applied(vm) == ["procver", "prctl"]

    assert guest_cli(vm, "undo", "prctl").status == 0
    assert guest_cli(vm, "undo", "procver").status == 0
    assert applied(vm) == []
    assert vm.run(["cat", "/proc/version"], check=True).out == before
    assert "livesplice" not in vm.run(["cat", "/proc/modules"]).out
    problems = vm.dmesg_problems(mark)
    assert not problems, problems
