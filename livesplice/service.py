"""The boot service: systemd runs `livesplice apply --all` early at every boot.

`install_unit` writes livesplice.service (from the template in livesplice/data) with the command
of this very livesplice (its interpreter, `-m livesplice`: a virtual environment's works as well
as the system's) and enables it the way `systemctl enable` does, a link in the wants directory of
the target the unit names, so that it also works on an image that is not running (`--root`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from importlib import resources
from pathlib import Path

from .errors import BadInput

UNIT = "livesplice.service"
UNIT_DIR = Path("etc/systemd/system")
WANTED_BY = "sysinit.target"


def unit_text(exec_command: str) -> str:
    template = resources.files("livesplice").joinpath("data", UNIT).read_text()
    return template.replace("@EXEC@", exec_command)


def this_command() -> str:
    """The command line that runs this livesplice, whatever installed it."""
    return f"{shlex.quote(sys.executable)} -m livesplice"


def _reload(root: Path) -> None:
    """Tell a running systemd about the change (only for the running system's own root)."""
    if root.resolve() == Path("/") and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "daemon-reload"], check=False)


def install_unit(root: Path = Path("/")) -> dict:
    if not root.is_dir():
        raise BadInput(f"--root {root}: not a directory")
    unit_dir = root / UNIT_DIR
    unit = unit_dir / UNIT
    wants = unit_dir / f"{WANTED_BY}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    command = this_command()
    unit.write_text(unit_text(command))
    link = wants / UNIT
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path("/") / UNIT_DIR / UNIT)
    _reload(root)
    return {"unit": str(unit), "enabled": str(link), "exec": f"{command} apply --all"}


def remove_unit(root: Path = Path("/")) -> dict:
    unit = root / UNIT_DIR / UNIT
    link = root / UNIT_DIR / f"{WANTED_BY}.wants" / UNIT
    removed = unit.exists() or link.is_symlink()
    link.unlink(missing_ok=True)
    unit.unlink(missing_ok=True)
    _reload(root)
    return {"unit": str(unit), "removed": removed}
