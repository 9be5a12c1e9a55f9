"""Real fixes that change live data, rewritten with hooks (bench/hook-fixes/, docs/corpus.md),
applied on the stock 6.1.0-53-amd64 kernel in the VM with their effect observed, then undone.
The kernel log is checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, assert_clean, guest_cli, livesplice_cli, mark

pytestmark = pytest.mark.vm

FIXES = REPO / "bench" / "hook-fixes"
RMEM = "/proc/sys/net/ipv4/tcp_rmem"


def create(stock_kernel, out: Path, name: str) -> Path:
    proc = livesplice_cli("create", "--source", str(stock_kernel.source_tree), "--config",
                          str(stock_kernel.config), "--patch", str(FIXES / f"{name}.patch"),
                          "--id", name, "-o", str(out / f"{name}.tar.gz"))
    assert proc.returncode == 0, proc.stderr
    return out / f"{name}.tar.gz"


def set_rmem(vm, value: str) -> int:
    return vm.run(["sh", "-c", f'echo "{value}" > {RMEM}']).status


def test_tcp_rmem_minimum(stock_kernel, vm):
    """6.1.190's "tcp_rmem minimum below 4096 no longer accepted": its .extra1 change to
    ipv4_net_table (refused as changed data) made by hooks in place."""
    package = create(stock_kernel, vm.exchange, "c0144-tcp-rmem-min")
    default = vm.run(["cat", RMEM], check=True).out.split()
    since = mark(vm)
    assert set_rmem(vm, "2048 131072 6291456") == 0  # the stock kernel takes it
    assert set_rmem(vm, " ".join(default)) == 0
    r = guest_cli(vm, "apply", str(package))
    assert r.status == 0, r.err
    assert set_rmem(vm, "2048 131072 6291456") != 0  # refused now: below 4096
    assert vm.run(["cat", RMEM], check=True).out.split() == default
    assert set_rmem(vm, "4096 131072 6291456") == 0  # the minimum itself is fine
    # a namespace made while it is applied copies the table, minimum included
    netns = vm.run(["unshare", "-n", "sh", "-c", f'echo "2048 131072 6291456" > {RMEM}'])
    assert netns.status != 0
    assert guest_cli(vm, "undo", "c0144-tcp-rmem-min").status == 0
    assert set_rmem(vm, "2048 131072 6291456") == 0  # the stock behaviour again
    assert set_rmem(vm, " ".join(default)) == 0
    assert_clean(vm, since)
