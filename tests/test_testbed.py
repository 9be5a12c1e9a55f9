"""The VM test bed against the real stock Debian kernel (6.1.0-53-amd64, or the one `--kernel`
names) under QEMU/TCG."""

import pytest
from conftest import livesplice_cli

from livesplice import debian
from livesplice.errors import BadInput
from livesplice.testbed import CommandTimeout, GuestPanic, Session


def test_uname_and_kallsyms(vm):
    assert vm.run(["uname", "-r"], check=True).out.strip() == vm.kernel
    assert vm.run(["id", "-u"], check=True).out.strip() == "0"
    lines = vm.run(["grep", " version_proc_show$", "/proc/kallsyms"], check=True).out.split()
    assert int(lines[0], 16) != 0 and lines[2] == "version_proc_show"


def test_many_commands_one_session(vm):
    for i in range(5):
        assert vm.run(["sh", "-c", f"echo {i}"], check=True).out == f"{i}\n"


def test_output_and_status_come_back_exactly(vm):
    result = vm.run("printf 'a\\0b\\n'; printf 'oops' >&2; exit 42")
    assert (result.status, result.stdout, result.stderr) == (42, b"a\0b\n", b"oops")
    assert vm.run(["false"]).status == 1
    big = vm.run("head -c 3000000 /dev/zero | tr '\\0' x")
    assert big.stdout == b"x" * 3_000_000


def test_guest_writes_reach_host_only_through_rwdir(vm, tmp_path):
    vm.run(["sh", "-c", f"echo hello > {vm.exchange}/f"], check=True)
    assert (vm.exchange / "f").read_text() == "hello\n"
    # The rest of the host, /tmp included (a checkout may live there), is visible read-only
    # through an overlay: the guest can write, the host never sees it.
    (tmp_path / "host-file").write_text("from the host\n")
    assert vm.run(["cat", str(tmp_path / "host-file")], check=True).out == "from the host\n"
    vm.run(["sh", "-c", f"echo nope > {tmp_path}/g"], check=True)
    assert not (tmp_path / "g").exists()


def test_timeout_is_reported_and_session_survives(vm):
    with pytest.raises(CommandTimeout) as info:
        vm.run("echo started; sleep 30", timeout=1)
    assert info.value.stdout == b"started\n"
    assert vm.run(["echo", "still here"], check=True).out == "still here\n"


def test_panic_is_detected_with_console(stock_kernel):
    with Session(kernel=stock_kernel.kernel.abi) as session:
        with pytest.raises(GuestPanic) as info:
            session.run("echo c > /proc/sysrq-trigger", timeout=60)
    assert "Kernel panic" in info.value.console
    assert "sysrq" in info.value.console.lower()


def test_cli_run_passes_output_and_status(stock_kernel):
    abi = stock_kernel.kernel.abi
    proc = livesplice_cli("vm", "run", "--kernel", abi, "--", "sh", "-c", "uname -r; echo e >&2; exit 5")
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == abi + "\n"
    assert proc.stderr == "e\n"


def test_cli_unknown_kernel():
    proc = livesplice_cli("vm", "run", "--kernel", "5.10.0-1-amd64", "--", "true")
    assert proc.returncode == 2
    assert "unknown kernel '5.10.0-1-amd64'" in proc.stderr
    for abi in debian.KNOWN_KERNELS:
        assert abi in proc.stderr
    assert livesplice_cli("vm", "fetch", "--kernel", "nope").returncode == 2


def test_cli_missing_qemu(stock_kernel):
    proc = livesplice_cli("vm", "run", "--", "true", env={"LIVESPLICE_QEMU": "/nonexistent/qemu"})
    assert proc.returncode == 2
    assert "QEMU not found" in proc.stderr


def test_cli_not_root(stock_kernel):
    # A user namespace without mappings: the same files, but the process is no longer root.
    proc = livesplice_cli("vm", "run", "--", "true", prefix=("unshare", "--user"))
    assert proc.returncode == 2
    assert "must run as root" in proc.stderr


def test_session_api_checks_kernel_name():
    with pytest.raises(BadInput):
        Session(kernel="no-such-kernel").start()
