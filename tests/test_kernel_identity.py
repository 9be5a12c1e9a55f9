"""The target check identifies the running kernel by its build id, not by /proc/version's text,
which an applied update can change (safety issue, item 13). In the VM, on 6.1.0-53-amd64."""

import json

import pytest

from livesplice import debian
from livesplice.package import Package
from conftest import GUEST_CLI, REPO, edit_patch, guest_cli, livesplice_cli

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
    source, out, made = stock_kernel.source_tree, vm.exchange, {}
    for name, edits in (("procver", PROC_VERSION), ("prctl", PRCTL)):
        (out / f"{name}.patch").write_text(edit_patch(source, edits))
        proc = livesplice_cli("create", "--source", str(source), "--config",
                              str(stock_kernel.config), "--patch", str(out / f"{name}.patch"),
                              "--id", name, "-o", str(out / f"{name}.tar.gz"))
        assert proc.returncode == 0, proc.stderr
        made[name] = out / f"{name}.tar.gz"
    return made


def applied(vm) -> list[str]:
    result = guest_cli(vm, "list", "--json")
    assert result.status == 0, result.err
    return [u["id"] for u in json.loads(result.out)]


def dmesg_mark(vm) -> int:
    return len(vm.dmesg().splitlines())


def test_image_build_id_is_the_running_kernels(vm, stock_kernel):
    """What create records (from the cached vmlinuz) is what the booted kernel shows."""
    expected = debian.image_build_id(stock_kernel)
    assert expected and len(expected) == 40
    notes = vm.run(["cat", "/sys/kernel/notes"], check=True).stdout
    from livesplice.buildid import gnu_build_id
    assert gnu_build_id(notes) == expected
    r = vm.run([GUEST_CLI[0], "-c", "from livesplice import kernel; print(kernel.running_build_id())"],
               cwd=str(REPO))
    assert r.status == 0, r.err
    assert r.out.strip() == expected


def test_packages_record_the_build_id(stock_kernel, packages):
    for path in packages.values():
        target = Package.read(path).manifest["target"]
        assert target["build_id"] == debian.image_build_id(stock_kernel)
        assert target["release"] == stock_kernel.kernel.abi


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
