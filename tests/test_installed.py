"""Installed updates and the boot service, without a kernel: packages made for the stock kernel
are kept for its release on this machine (which runs another), where they wait for it. The VM
tests (test_reboot.py) apply them, at boot included."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

import packages
from livesplice import installed, kernel
from livesplice.cli import main
from livesplice.service import UNIT, install_unit, remove_unit, unit_text

RELEASE = packages.MANIFEST["kernel"]["release"]


@pytest.fixture(autouse=True)
def install_dir(tmp_path, monkeypatch):
    d = tmp_path / "var-lib-livesplice"
    monkeypatch.setenv(installed.INSTALL_DIR_ENV, str(d))
    monkeypatch.setenv("LIVESPLICE_TRUSTED_KEYS", str(tmp_path / "no-keys"))
    monkeypatch.setattr(kernel, "require_root", lambda: None)
    if kernel.running_release() == RELEASE:
        pytest.skip("this machine runs the packages' kernel: test_reboot.py covers it")
    return d


def package(tmp_path: Path, update_id: str, release: str = RELEASE) -> Path:
    m = packages.manifest()
    m["id"] = update_id
    m["kernel"]["release"] = release
    m["module"] = {"name": f"livesplice_{update_id}", "file": f"modules/livesplice_{update_id}.ko"}
    path = tmp_path / f"{update_id}.tar.gz"
    packages.write_package(path, m, members_=packages.members(f"livesplice_{update_id}"))
    return path


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_a_package_for_another_kernel_is_kept_and_waits(tmp_path, install_dir):
    r = cli("install", str(package(tmp_path, "fix1")), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["state"] == "waiting for its kernel" and out["apply"] is None
    assert (install_dir / RELEASE / "fix1.tar.gz").read_bytes() == (tmp_path / "fix1.tar.gz").read_bytes()
    assert (install_dir / RELEASE / "order").read_text() == "fix1\n"
    listed = json.loads(cli("list", "--installed", "--json").output)
    assert [(i["id"], i["release"], i["applied"], i["running_kernel"]) for i in listed] == \
        [("fix1", RELEASE, False, False)]


def test_the_order_is_the_install_order_and_uninstall_keeps_the_rest(tmp_path, install_dir):
    for name in ("fix1", "fix2", "fix3"):
        assert cli("install", "--no-apply", str(package(tmp_path, name))).exit_code == 0
    assert [i.id for i in installed.installed(RELEASE)] == ["fix1", "fix2", "fix3"]
    r = cli("uninstall", "fix2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["releases"] == [RELEASE] and json.loads(r.output)["undo"] is None
    assert (install_dir / RELEASE / "order").read_text() == "fix1\nfix3\n"
    assert not (install_dir / RELEASE / "fix2.tar.gz").exists()
    for name in ("fix1", "fix3"):
        assert cli("uninstall", name).exit_code == 0
    assert not (install_dir / RELEASE).exists()  # nothing left behind


def test_installing_twice_is_nothing_to_do_and_another_package_of_that_id_is_refused(tmp_path):
    path = package(tmp_path, "fix1")
    assert cli("install", str(path)).exit_code == 0
    assert cli("install", str(path)).exit_code == 4
    other = tmp_path / "other"
    other.mkdir()
    m = packages.manifest()
    m["patch"] = m["patch"].replace("new()", "newer()")
    packages.write_package(other / "fix1.tar.gz", m)
    r = cli("install", str(other / "fix1.tar.gz"))
    assert r.exit_code == 2 and "another package with id fix1 is installed" in r.output


def test_bad_input_installs_nothing(tmp_path, install_dir):
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(b"not a package")
    assert cli("install", str(damaged)).exit_code == 2
    assert cli("install", str(tmp_path / "missing.tar.gz")).exit_code == 2
    assert cli("uninstall", "nothing-such").exit_code == 2
    evil = package(tmp_path, "evil", release="../../etc")
    r = cli("install", str(evil))
    assert r.exit_code == 2 and "is not a kernel release" in r.output  # the package format's check
    with pytest.raises(installed.BadInput, match="cannot name an install directory"):
        installed._release_dir("..")  # and the installer's own
    assert not install_dir.exists() or not any(install_dir.rglob("*.tar.gz"))


def test_apply_all_and_undo_all_on_a_kernel_with_nothing_installed_have_nothing_to_do(tmp_path):
    # the host runs another kernel: its installed updates (none) need nothing
    assert cli("install", "--no-apply", str(package(tmp_path, "fix1"))).exit_code == 0
    assert cli("apply", "--all").exit_code == 4
    assert cli("undo", "--all").exit_code == 4


def test_apply_takes_a_package_or_all(tmp_path):
    assert cli("apply").exit_code == 2
    assert cli("apply", "--all", str(package(tmp_path, "fix1"))).exit_code == 2
    assert cli("undo").exit_code == 2
    r = cli("apply", "--all", "--dry-run", "--json")
    assert r.exit_code == 2 and json.loads(r.output)["status"] == 2


def test_the_boot_unit_runs_this_livesplice_early_and_is_enabled(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    result = install_unit(root)
    unit = root / "etc/systemd/system" / UNIT
    text = unit.read_text()
    assert result["exec"] in text and "-m livesplice apply --all" in text
    for line in ("DefaultDependencies=no", "Before=sysinit.target network-pre.target shutdown.target",
                 "ConditionKernelCommandLine=!livesplice.disable=1", "SuccessExitStatus=4",
                 "Type=oneshot", "WantedBy=sysinit.target"):
        assert line in text.splitlines(), line
    link = root / "etc/systemd/system/sysinit.target.wants" / UNIT
    assert os.readlink(link) == "/etc/systemd/system/" + UNIT
    assert stat.S_ISREG(unit.stat().st_mode) and "@EXEC@" not in text
    assert remove_unit(root)["removed"] and not unit.exists() and not link.is_symlink()
    assert "@EXEC@" in unit_text("@EXEC@")


def test_uninstall_completes_installed_ids(tmp_path, install_dir):
    from test_cli import complete

    for name in ("fix1", "fix2"):
        assert cli("install", "--no-apply", str(package(tmp_path, name))).exit_code == 0
    env = {installed.INSTALL_DIR_ENV: str(install_dir)}
    assert complete("livesplice uninstall f", env=env) == ["plain,fix1", "plain,fix2"]
    assert complete("livesplice uninstall x", env=env) == []
