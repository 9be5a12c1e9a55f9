"""Real fixes that change live data, rewritten with hooks (bench/hook-fixes/, docs/corpus.md),
applied on the stock 6.1.0-53-amd64 kernel in the VM with their effect observed, then undone.
The kernel log is checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_clean, guest_cli, livesplice_cli, mark

pytestmark = pytest.mark.vm

FIXES = REPO / "bench" / "hook-fixes"
GUEST = REPO / "tests" / "guest"
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


def mptcp_join(vm, name: str) -> tuple[bool, int]:
    """Whether the server's subflow to its backup endpoint (id 5), joined through a syncookie,
    has the backup flag the server asks for, and its local id (tests/guest/mptcp_join.py)."""
    r = vm.run([sys.executable, str(GUEST / "mptcp_join.py"), f"srv-{name}", f"cli-{name}"],
               timeout=120)
    assert r.status == 0, r.err
    seen = json.loads(r.out)
    assert "flags" in seen, seen
    return "b" in seen["flags"], seen["local_id"]


def test_mptcp_join_backup_through_syncookie(stock_kernel, vm):
    """6.1.190's "mptcp: pm: fix backup support in signal endpoints" (and local id) for joins
    through a syncookie: struct join_entry's new request_bkup bit (refused as a changed layout)
    kept in shadow data of each entry."""
    package = create(stock_kernel, vm.exchange, "c0168-mptcp-join-backup")
    since = mark(vm)
    # the stock kernel: the rebuilt request socket has the other join's id and (no) flag
    assert mptcp_join(vm, "before") == (False, 0)
    r = guest_cli(vm, "apply", str(package))
    assert r.status == 0, r.err
    for i in range(2):  # the second finds the entry's shadow data from the first, and rewrites it
        assert mptcp_join(vm, f"applied{i}") == (True, 5)
    assert guest_cli(vm, "undo", "c0168-mptcp-join-backup").status == 0
    assert mptcp_join(vm, "after") == (False, 0)
    assert_clean(vm, since)


def pad(vm, *args: str) -> dict:
    """An Xbox 360 style pad on the guest's USB stack through USB/IP (tests/guest/usbip_pad.py):
    the driver bound to its interface and its input device's name."""
    r = vm.run([sys.executable, str(GUEST / "usbip_pad.py"), *args], timeout=120)
    assert r.status == 0, r.err
    return json.loads(r.out) if r.out.strip() else {}


AZERON = ("16d0", "1103")  # an Azeron Cyro: a vendor 6.1.190 adds to xpad's table


def test_xpad_new_device_table(stock_kernel, vm):
    """6.1.190's new xpad devices (Azeron): its xpad_table and xpad_device entries (refused as
    changed data: xpad_driver, which points to the table) as tables of the patch's own, the
    driver pointed at the longer one by hooks while applied; a module target."""
    package = create(stock_kernel, vm.exchange, "m0135-xpad-azeron")
    vm.run(["modprobe", "-a", "xpad", "vhci-hcd"], check=True)
    since = mark(vm)
    # the stock driver takes a pad it knows (the test's pad works), not an Azeron
    assert pad(vm, "attach", "045e", "028e")["driver"] == "xpad"
    pad(vm, "detach")
    assert pad(vm, "attach", *AZERON)["driver"] is None
    r = guest_cli(vm, "apply", str(package))
    assert r.status == 0, r.err
    # POST_APPLY binds the pad plugged in before, with its name from the new xpad_device entries
    plugged = pad(vm, "state", *AZERON)
    assert (plugged["driver"], plugged["name"]) == ("xpad", "Azeron Cyro")
    pad(vm, "detach")
    assert pad(vm, "attach", *AZERON)["name"] == "Azeron Cyro"  # one plugged in now
    pad(vm, "detach")
    assert guest_cli(vm, "undo", "m0135-xpad-azeron").status == 0
    assert pad(vm, "attach", *AZERON)["driver"] is None  # the stock table again
    pad(vm, "detach")
    assert_clean(vm, since)
