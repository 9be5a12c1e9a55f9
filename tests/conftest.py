"""Shared fixtures. The test bed is real: a stock Debian kernel under QEMU, fetched on first use."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from livesplice import debian
from livesplice.testbed import Session

REPO = Path(__file__).resolve().parent.parent
# A test that uses one of these fixtures, directly or through another fixture, needs the stock kernel.
KERNEL_FIXTURES = {"stock_kernel", "vm"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--kernel", default=os.environ.get("LIVESPLICE_TEST_KERNEL",
                                                        debian.DEFAULT_KERNEL),
                     help="the stock kernel the `stock_kernel` and `vm` fixtures fetch and boot "
                          "(or $LIVESPLICE_TEST_KERNEL; default %(default)s), e.g. "
                          "6.12.111+deb12-amd64")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `vm` every test that needs the stock kernel through a fixture (`fixturenames` is the
    whole closure), so `pytest -m "not vm"` is the fast tier; tests that reach the kernel another
    way carry the mark themselves."""
    for item in items:
        if KERNEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def stock_kernel(request) -> debian.KernelFiles:
    """The stock kernel the tests run on: DEFAULT_KERNEL, or the one `--kernel` names."""
    return debian.fetch_kernel(debian.lookup_kernel(request.config.getoption("--kernel")).abi)


@pytest.fixture(scope="module")
def vm(stock_kernel, tmp_path_factory):
    """One booted guest per test module; `vm.exchange` is a directory both sides can write."""
    exchange = tmp_path_factory.mktemp("exchange")
    with Session(kernel=stock_kernel.kernel.abi, rwdirs=[str(exchange)]) as session:
        session.exchange = exchange
        yield session
        problems = session.dmesg_problems()
    assert not problems, "kernel log reports problems:\n" + "\n".join(problems)


def livesplice_cli(*args: str, env: dict | None = None, prefix: tuple[str, ...] = (),
                   timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([*prefix, sys.executable, "-m", "livesplice", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=REPO)


def edit_patch(tree: Path, edits: dict[str, list[tuple[str, str]]]) -> str:
    """A -p1 unified diff that makes each (old, new) text replacement (each old text must occur
    exactly once) in the named files of `tree`, which is left as it is."""
    from livesplice.patches import file_patch

    chunks = []
    for rel, replacements in edits.items():
        text = (tree / rel).read_text()
        new = text
        for old, repl in replacements:
            assert new.count(old) == 1, f"{rel}: {old!r} occurs {new.count(old)} times"
            new = new.replace(old, repl)
        chunks.append(file_patch(rel, text, new))
    return "".join(chunks)


GUEST_CLI = [sys.executable, "-m", "livesplice"]


def guest_cli(vm, *args: str, timeout: float = 300):
    """Run the livesplice command line inside the guest (the same interpreter and checkout)."""
    return vm.run([*GUEST_CLI, *args], timeout=timeout, cwd=str(REPO))


def mark(vm) -> int:
    """Where the guest's kernel log is now: what a test compares the log after it with."""
    return len(vm.dmesg().splitlines())


def log_since(vm, since: int) -> str:
    return "\n".join(vm.dmesg().splitlines()[since:])


def assert_clean(vm, since: int) -> None:
    """No Oops, BUG, WARNING or Call Trace in the kernel log since `mark`."""
    problems = vm.dmesg_problems(since)
    assert not problems, problems


def create_stacked_package(stock_kernel, out: Path, tree: Path, applied: dict, edits: dict,
                           name: str) -> Path:
    """A package made from a copy of the stock source at `tree` that already has the `applied`
    edits (an update stacked on theirs): hard links, the edited files written anew."""
    subprocess.run(["cp", "-al", str(stock_kernel.source_tree), str(tree)], check=True)
    for rel, replacements in applied.items():
        text = (tree / rel).read_text()
        for old, new in replacements:
            text = text.replace(old, new)
        (tree / rel).unlink()
        (tree / rel).write_text(text)
    (out / f"{name}.patch").write_text(edit_patch(tree, edits))
    proc = livesplice_cli("create", "--source", str(tree), "--config", str(stock_kernel.config),
                          "--patch", str(out / f"{name}.patch"), "--id", name,
                          "-o", str(out / f"{name}.tar.gz"))
    assert proc.returncode == 0, proc.stderr
    return out / f"{name}.tar.gz"


def create_packages(stock_kernel, out: Path, edits_by_id: dict[str, dict]) -> dict[str, Path]:
    """One package per id, each made from the stock source with its edits, into `out`."""
    made = {}
    for name, edits in edits_by_id.items():
        (out / f"{name}.patch").write_text(edit_patch(stock_kernel.source_tree, edits))
        proc = livesplice_cli("create", "--source", str(stock_kernel.source_tree), "--config",
                              str(stock_kernel.config), "--patch", str(out / f"{name}.patch"),
                              "--id", name, "-o", str(out / f"{name}.tar.gz"))
        assert proc.returncode == 0, proc.stderr
        made[name] = out / f"{name}.tar.gz"
    return made


def applied(vm) -> list[str]:
    """The ids of the updates applied in the guest, oldest first (`list --json`)."""
    r = guest_cli(vm, "list", "--json")
    assert r.status == 0, r.err
    return [u["id"] for u in json.loads(r.out)]


def nothing_loaded(vm) -> bool:
    return applied(vm) == [] and "livesplice" not in vm.run(["cat", "/proc/modules"]).out
