"""The fleet rollout on real hosts: three test-bed guests booting the Debian 12 system image
(sshd reachable from 127.0.0.1 only, no other network), two on the package's kernel
(6.1.0-53-amd64) and one on another (6.1.0-54-amd64, which must be skipped, not failed).
livesplice reaches them as a wheel through the collection's setup role; the rollout playbook
updates them batch by batch, and undoes and stops when a batch fails. Each guest's kernel log is
checked at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, create_packages

from livesplice import debian, sysimage
from livesplice.vmfleet import Fleet

pytestmark = pytest.mark.vm

COLLECTIONS = REPO / "ansible"
PRCTL_A = {"kernel/sys.c": [
    ("if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {",
     "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")]}
PRCTL = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
         "print(libc.prctl(4, 1, 1, 0, 0))")
# The wrong kernel first: it is the canary batch of the rollouts below.
KERNELS = ["6.1.0-54-amd64", "6.1.0-53-amd64", "6.1.0-53-amd64"]


@pytest.fixture(scope="module")
def fleet(stock_kernel, tmp_path_factory):
    for kernel in set(KERNELS):
        debian.fetch_kernel(kernel, with_source=False)
    work = tmp_path_factory.mktemp("fleet")
    package = create_packages(stock_kernel, work, {"prctl-a": PRCTL_A})["prctl-a"]
    with Fleet(KERNELS, work / "guests") as f:
        f.package = package
        f.inventory_file = f.inventory(work / "inventory.ini")
        f.work = work
        r = ansible(f, "playbook", "livesplice.fleet.setup",
                    "-e", f"livesplice_wheelhouse={sysimage.wheelhouse()}")
        assert r.returncode == 0, r.stdout[-3000:]
        yield f
        problems = {g.name: g.session.dmesg_problems() for g in f.guests}
    assert not any(problems.values()), problems


def ansible(fleet, kind: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).with_name(f"ansible-{kind}" if kind != "adhoc" else "ansible")
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), ANSIBLE_HOST_KEY_CHECKING="False",
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORKS="3", ANSIBLE_LOCAL_TEMP=str(fleet.workdir / "tmp"),
               ANSIBLE_HOME=str(fleet.workdir / "ansible-home"))
    return subprocess.run([str(tool), "-i", str(fleet.inventory_file), *args,
                           *(["--check"] if check else [])],
                          capture_output=True, text=True, env=env, timeout=1800)


def rollout(fleet, name: str, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    summary = fleet.work / f"{name}.json"
    r = ansible(fleet, "playbook", "livesplice.fleet.rollout", "-e",
                f"livesplice_package={fleet.package}", "-e", f"livesplice_summary_file={summary}",
                "-e", "livesplice_batch=2", *extra)
    return r, json.loads(summary.read_text())


def applied(guest) -> list[str]:
    r = guest.session.run([f"{sysimage.VENV}/bin/livesplice", "list", "--json"], check=True)
    return [u["id"] for u in json.loads(r.out)]


def prctl(guest) -> int:
    return int(guest.session.run(["python3", "-c", PRCTL], check=True).out)


def test_rollout_canary_batches_idempotent_and_removed(fleet):
    wrong, first, second = fleet.guests
    r, summary = rollout(fleet, "rollout")
    assert r.returncode == 0, r.stdout[-4000:]
    assert summary["updated"] == ["guest2", "guest3"] and summary["skipped"] == ["guest1"], summary
    assert summary["refused"] == summary["failed"] == summary["undone"] == []
    assert all(summary["pause_ms"][h] > 0 for h in ("guest2", "guest3"))
    assert applied(first) == applied(second) == ["prctl-a"] and applied(wrong) == []
    assert prctl(first) == prctl(second) == -1 and prctl(wrong) == 0  # live where it applied
    # kept for reboots too (the default state: installed)
    listed = json.loads(first.session.run([f"{sysimage.VENV}/bin/livesplice", "list",
                                           "--installed", "--json"], check=True).out)
    assert [i["id"] for i in listed] == ["prctl-a"]

    # Again (without writing a summary file): nothing changes anywhere.
    r = ansible(fleet, "playbook", "livesplice.fleet.rollout", "-e",
                f"livesplice_package={fleet.package}", "-e", "livesplice_batch=2")
    assert r.returncode == 0, r.stdout[-4000:]
    assert "updated 0 [], already 2," in r.stdout
    recap = [line for line in r.stdout.splitlines() if "changed=" in line]
    assert len(recap) == 3 and all("changed=0" in line for line in recap), recap

    # Removal, check mode first: it says it would, and changes nothing.
    r = ansible(fleet, "adhoc", "livesplice", "-m", "livesplice.fleet.update",
                "-a", "id=prctl-a state=absent", check=True)
    assert r.returncode == 0 and r.stdout.count("CHANGED") == 2, r.stdout
    assert applied(first) == ["prctl-a"]
    r = ansible(fleet, "adhoc", "livesplice", "-m", "livesplice.fleet.update",
                "-a", "id=prctl-a state=absent")
    assert r.returncode == 0 and r.stdout.count("CHANGED") == 2, r.stdout
    assert applied(first) == applied(second) == [] and prctl(first) == 0
    r = ansible(fleet, "adhoc", "livesplice", "-m", "livesplice.fleet.update",
                "-a", "id=prctl-a state=absent")
    assert r.returncode == 0 and "CHANGED" not in r.stdout, r.stdout


def test_a_failing_batch_is_undone_and_stops_the_rollout(fleet):
    wrong, first, second = fleet.guests
    # guest3's health check fails: guest2, updated in the same batch, is undone too.
    r, summary = rollout(fleet, "failing", "-e",
                         "livesplice_health_command='test \"$(hostname)\" != guest3'")
    assert r.returncode != 0
    assert summary["failed"] == ["guest3"] and summary["undone"] == ["guest2"], summary
    assert summary["skipped"] == ["guest1"] and summary["updated"] == []
    assert applied(first) == applied(second) == [] and prctl(first) == prctl(second) == 0

    # guest2 fails in a canary batch of two: the rollout stops there, guest3 is not reached.
    r, summary = rollout(fleet, "stopped", "-e", "livesplice_canary=2", "-e",
                         "livesplice_health_command='test \"$(hostname)\" != guest2'")
    assert r.returncode != 0
    assert summary["failed"] == ["guest2"] and summary["not_reached"] == ["guest3"], summary
    assert "the given command" in summary["reasons"]["guest2"].lower()
    assert applied(first) == applied(second) == []


def test_vm_fleet_command_boots_guests_and_runs_a_command_against_their_inventory(tmp_path):
    inventory = tmp_path / "hosts.ini"
    ansible_bin = Path(sys.executable).with_name("ansible")
    r = subprocess.run([sys.executable, "-m", "livesplice", "vm", "fleet", "--kernel",
                        "6.1.0-53-amd64", "--inventory", str(inventory), "--",
                        str(ansible_bin), "-i", str(inventory), "livesplice", "-m", "ansible.builtin.command",
                        "-a", "uname -r"],
                       capture_output=True, text=True, timeout=900, cwd=REPO,
                       env=dict(os.environ, ANSIBLE_NOCOLOR="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "guest1 | CHANGED | rc=0 >>\n6.1.0-53-amd64" in r.stdout, r.stdout
    assert "ansible_port=" in inventory.read_text()
