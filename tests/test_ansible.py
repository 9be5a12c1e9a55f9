"""The Ansible collection, without hosts: its module's documentation parses, and its playbooks
pass Ansible's syntax check (test_fleet.py runs them on guests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(REPO / "ansible"), ANSIBLE_NOCOLOR="1")


def test_module_documentation_parses():
    r = subprocess.run([str(BIN / "ansible-doc"), "--json", "livesplice.fleet.update"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "other_kernel" in r.stdout and "wrong_kernel" in r.stdout


@pytest.mark.parametrize("playbook", ["livesplice.fleet.rollout", "livesplice.fleet.setup"])
def test_playbook_syntax(playbook, tmp_path):
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[livesplice]\nhost1 ansible_host=127.0.0.1\n")
    r = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), "--syntax-check",
                        playbook], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
