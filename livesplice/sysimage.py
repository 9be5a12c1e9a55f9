"""A Debian 12 system for the test bed's guests that boot a real init: systemd as PID 1, udev,
sshd and Python, on a disk of their own.

The reboot tests need a real boot (systemd runs the boot service) and state that survives it; the
fleet tests need hosts with sshd and python3. Neither may use this machine's own root with
systemd as init (it would start this machine's services), so they boot this image instead: made
once with mmdebstrap (apt's own configuration and mirrors, Debian's keyring), as an ext4 file
system in the cache, and given to each guest as a copy-on-write qcow2 disk of its own, which
keeps the guest's state from one boot to the next.

What livesplice itself a guest runs comes in as a wheel (`wheelhouse`): installed into a
virtual environment on the guest's disk, as an administrator would.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import debian
from .errors import BadInput, LivespliceError

log = logging.getLogger(__name__)

SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "udev", "kmod", "dbus", "python3", "python3-venv",
            "openssh-server", "iproute2", "procps", "ca-certificates")
# mmdebstrap's customize hooks ($1: the new root). The guest's console: root logs in without a
# password on ttyS0 only (a test bed's guest is reachable from this machine alone); sshd accepts
# keys only, and each guest makes its own host keys at its first boot.
HOOKS = (
    'echo livesplice-guest > "$1/etc/hostname"',
    'passwd --root "$1" -d root',
    'rm -f "$1"/etc/ssh/ssh_host_*',
    'mkdir -p "$1/root/.ssh" && chmod 700 "$1/root/.ssh"',
    'printf "PasswordAuthentication no\\nPermitRootLogin prohibit-password\\n" '
    '> "$1/etc/ssh/sshd_config.d/livesplice.conf"',
    'mkdir -p "$1/etc/systemd/system/ssh.service.d" && printf '
    '"[Service]\\nExecStartPre=\\nExecStartPre=/usr/bin/ssh-keygen -A\\n'
    'ExecStartPre=/usr/sbin/sshd -t\\n" '
    '> "$1/etc/systemd/system/ssh.service.d/livesplice-keys.conf"',
    # The one network a guest may have: QEMU's user network with restrict=on (the host's
    # forwarded port comes in; nothing goes out), its fixed address, by systemd-networkd.
    'mkdir -p "$1/etc/systemd/network" && printf "[Match]\\nName=en* eth*\\n\\n[Network]\\n'
    'Address=10.0.2.15/24\\nGateway=10.0.2.2\\n" > "$1/etc/systemd/network/10-livesplice.network"',
    'systemctl --root="$1" enable systemd-networkd.service',
)
IMAGE_SIZE = "2G"
VENV = "/opt/livesplice"  # where a guest's livesplice is installed


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BadInput(f"{name} is not installed: run scripts/setup.sh")
    return path


def image_path() -> Path:
    key = hashlib.sha256("\n".join((SUITE, IMAGE_SIZE) + PACKAGES + HOOKS).encode()).hexdigest()[:12]
    return debian.cache_root() / "images" / f"{SUITE}-system-{key}.ext4"


def system_image() -> Path:
    """The cached image, made first if need be (a few minutes: some 250 MB of packages)."""
    image = image_path()
    if image.exists():
        return image
    image.parent.mkdir(parents=True, exist_ok=True)
    log.info("making the system image %s with mmdebstrap (%s)", image, ", ".join(PACKAGES))
    with tempfile.TemporaryDirectory(prefix="livesplice-image-", dir=image.parent) as tmp:
        root = Path(tmp) / "root"
        argv = [_tool("mmdebstrap"), "--variant=minbase", "--include=" + ",".join(PACKAGES),
                *(f"--customize-hook={h}" for h in HOOKS), SUITE, str(root)]
        run = subprocess.run(argv, capture_output=True, text=True)
        if run.returncode != 0:
            raise LivespliceError(f"mmdebstrap failed ({run.returncode}): {run.stderr[-2000:]}")
        part = Path(tmp) / "image.ext4"
        run = subprocess.run([_tool("mkfs.ext4"), "-q", "-L", "livesplice-root", "-d", str(root),
                              str(part), IMAGE_SIZE], capture_output=True, text=True)
        if run.returncode != 0:
            raise LivespliceError(f"mkfs.ext4 failed: {run.stderr[-2000:]}")
        os.replace(part, image)
    for old in image.parent.glob(f"{SUITE}-system-*.ext4"):  # of an older package list
        if old != image:
            old.unlink()
    return image


def new_disk(path: Path) -> Path:
    """A guest's own disk: a qcow2 over the cached image (which it never writes)."""
    base = system_image()
    run = subprocess.run([_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "raw",
                          "-b", str(base), str(path)], capture_output=True, text=True)
    if run.returncode != 0:
        raise LivespliceError(f"qemu-img create failed: {run.stderr}")
    return path


def wheelhouse() -> Path:
    """livesplice's wheel and its dependencies', for a guest's (or a fleet host's) offline
    install: `pip install --no-index --find-links DIR livesplice`. Rebuilt for each version of
    the source; the dependencies' wheels come from the package index once, then the cache."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "pyproject.toml").exists():
        raise BadInput(f"livesplice's source is not at {repo}: a wheelhouse is built from it")
    out = debian.cache_root() / "wheelhouse"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("livesplice-*.whl"):
        old.unlink()
    leftover = not (repo / "build").exists()
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                          "--wheel-dir", str(out), "--find-links", str(out), str(repo)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise LivespliceError(f"pip wheel failed: {run.stderr[-2000:]}")
    if leftover:
        shutil.rmtree(repo / "build", ignore_errors=True)  # what setuptools leaves in the tree
    return out


def install_livesplice(session, wheels: Path, timeout: float = 600) -> str:
    """Install livesplice from `wheels` (a directory the guest sees at the same path) into a
    virtual environment on a system guest's disk; the command that runs it there."""
    pip = f"{VENV}/bin/pip install -q --no-index --disable-pip-version-check --find-links {wheels}"
    # (then this very wheel again: a rebuilt one has the same version number)
    script = (f"set -e; python3 -m venv {VENV}; {pip} livesplice; "
              f"{pip} --no-deps --force-reinstall livesplice")
    r = session.run(["/bin/sh", "-c", script], timeout=timeout)
    if r.status != 0:
        raise LivespliceError(f"installing livesplice in the guest failed: {r.err[-2000:]}")
    return f"{VENV}/bin/livesplice"
