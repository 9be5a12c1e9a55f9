"""Several test-bed guests at once, reachable over SSH from this machine only, and their Ansible
inventory: the hosts the fleet rollout is tested on.

Each guest boots the system image (sysimage) on a disk of its own with one vCPU (three emulated
guests share two cores), its sshd forwarded from a free port of 127.0.0.1; QEMU's user network
runs with `restrict=on`, so a guest reaches no address at all. The fleet's SSH key is made here
and written into each guest's root account through the test-bed agent.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import sysimage
from .errors import LivespliceError
from .testbed import Session

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Guest:
    name: str
    kernel: str
    port: int
    session: Session


@dataclass
class Fleet:
    """`kernels`: one guest per entry (the same kernel may come several times)."""

    kernels: list[str]
    workdir: Path
    memory: str = "768M"
    rwdirs: list[str] = field(default_factory=list)
    guests: list[Guest] = field(default_factory=list)

    @property
    def key(self) -> Path:
        return self.workdir / "id_ed25519"

    def __enter__(self) -> Fleet:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "livesplice-fleet",
                            "-f", str(self.key)], check=True)
        public = self.key.with_suffix(".pub").read_text().strip()
        for i, kernel in enumerate(self.kernels, 1):
            name = f"guest{i}"
            disk = self.workdir / f"{name}.qcow2"
            if not disk.exists():
                sysimage.new_disk(disk)
            port = free_port()
            session = Session(kernel=kernel, cpus=1, memory=self.memory, disk=disk, ssh_port=port,
                              rwdirs=self.rwdirs, boot_timeout=400)
            log.info("booting %s (%s), ssh on 127.0.0.1:%d", name, kernel, port)
            session.start()
            self.guests.append(Guest(name, kernel, port, session))
            session.run(["/bin/sh", "-c", f"mkdir -p /root/.ssh && echo '{public}' > "
                         "/root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys && "
                         f"hostnamectl set-hostname {name} 2>/dev/null || hostname {name}"],
                        check=True)
        for guest in self.guests:
            self._wait_for_ssh(guest)

    def _wait_for_ssh(self, guest: Guest, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(["ssh", *self.ssh_options(), "-p", str(guest.port), "root@127.0.0.1",
                                "true"], capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LivespliceError(f"{guest.name}: sshd does not answer on 127.0.0.1:"
                                      f"{guest.port}: {r.stderr.strip()}")
            time.sleep(2)

    def ssh_options(self) -> list[str]:
        # The guests' host keys are new at each first boot and seen by nobody else.
        return ["-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o",
                "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=20"]

    def inventory(self, path: Path, group: str = "livesplice") -> Path:
        """An INI inventory of the guests in `group`, with how to reach them."""
        lines = [f"[{group}]"]
        for g in self.guests:
            lines.append(f"{g.name} ansible_host=127.0.0.1 ansible_port={g.port} "
                         f"livesplice_testbed_kernel={g.kernel}")
        lines += ["", f"[{group}:vars]", "ansible_user=root",
                  f"ansible_ssh_private_key_file={self.key}",
                  "ansible_ssh_common_args='" + " ".join(self.ssh_options()[2:]) + "'",
                  "ansible_python_interpreter=/usr/bin/python3", ""]
        path.write_text("\n".join(lines))
        return path

    def close(self) -> None:
        for guest in self.guests:
            guest.session.close()
        self.guests = []
