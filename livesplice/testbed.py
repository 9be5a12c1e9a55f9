"""The test bed: a stock Debian kernel booted under QEMU, running commands on this machine's files.

The guest's root file system is this machine's own `/`, shared read-only over 9p and made writable
with an overlay on a tmpfs, so that the guest sees the same paths, Python and livesplice as the host
and cannot damage them. Host directories passed as `rwdirs` are shared writable at the same paths.
A small initramfs (busybox and the kernel's own 9p/virtio modules) sets this up, then hands PID 1 to
`guest_agent`, which runs the host's commands over a virtio-serial port and returns their output and
exit status exactly. One boot serves many commands.

QEMU runs with TCG: this host's KVM only runs PVM guests.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import debian
from .errors import BadInput, GuestDied, LivespliceError

QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
# Modules (with their dependencies) the initramfs loads before it can mount the host's root.
INITRAMFS_MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay", "virtio_blk",
                     "crc32c_generic", "ext4", "virtio_net")  # (ext4 needs crc32c, a soft dependency)
NINEP_OPTS = "trans=virtio,version=9p2000.L,msize=512000"
log = logging.getLogger(__name__)
DEFAULT_CPU = "max"
BAD_DMESG = re.compile(r"Oops|BUG[: ]|WARNING:|Call Trace|general protection|Kernel panic")


class GuestError(GuestDied):
    """The guest kernel failed (exit status 5 from the command line): `console` holds the end of
    its console log."""


class GuestPanic(GuestError):
    pass


class GuestHung(GuestError):
    pass


class CommandTimeout(LivespliceError):
    def __init__(self, argv: list[str], timeout: float, stdout: bytes, stderr: bytes):
        super().__init__(f"command {argv!r} did not finish within {timeout:g} s (killed)")
        self.stdout, self.stderr = stdout, stderr


@dataclass
class Result:
    argv: list[str]
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


def require_host() -> None:
    """The test bed's preconditions on this machine, each with a clear message."""
    if os.geteuid() != 0:
        raise BadInput("the test bed must run as root: the guest's root user works on this machine's "
                       "files (Python, the cache under ~root) through 9p with the host user's rights")
    if not shutil.which(qemu_binary()):
        raise BadInput(f"QEMU not found ({qemu_binary()}): install qemu-system-x86 "
                       "(scripts/setup.sh does)")
    if not os.path.exists(BUSYBOX):
        raise BadInput(f"{BUSYBOX} not found: install busybox-static (scripts/setup.sh does)")


def qemu_binary() -> str:
    return os.environ.get("LIVESPLICE_QEMU", QEMU)


# --- initramfs ---------------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/sh
# livesplice test-bed init: mount the host's root read-only with a tmpfs overlay, then run the agent.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.load); do insmod "/modules/$m" || echo "livesplice init: insmod $m failed"; done
arg() { sed -n "s/.*livesplice\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
PY=$(arg python); AGENT=$(arg agent); MODS=$(arg modules); RW=$(arg rwdirs)
mkdir -p /host /ovl /newroot
if [ "$(arg disk)" = 1 ]; then
  # A system of its own (sysimage): its disk as root, systemd as init; of this machine only the
  # kernel's modules (read-only) and the rwdirs. The agent runs as a service of that system.
  mount -t ext4 /dev/vda /newroot || { echo "livesplice init: no root disk"; poweroff -f; }
  rel=$(uname -r)
  mkdir -p "/newroot/usr/lib/modules/$rel"
  mount -t 9p -o ro,NINEP_OPTS modules "/newroot/usr/lib/modules/$rel"
  i=0
  for d in $(echo "$RW" | tr ',' ' '); do
    mkdir -p "/newroot$d" && mount -t 9p -o NINEP_OPTS "rw$i" "/newroot$d"; i=$((i+1))
  done
  mkdir -p /newroot/usr/local/lib/livesplice /newroot/etc/systemd/system/multi-user.target.wants
  cp /guest_agent.py /newroot/usr/local/lib/livesplice/guest_agent.py
  cp /agent.service /newroot/etc/systemd/system/livesplice-testbed-agent.service
  ln -sf ../livesplice-testbed-agent.service \
    /newroot/etc/systemd/system/multi-user.target.wants/livesplice-testbed-agent.service
  for d in proc sys dev; do mount --move /$d /newroot/$d; done
  exec switch_root /newroot /sbin/init
fi
mount -t 9p -o ro,NINEP_OPTS hostroot /host || { echo "livesplice init: no host root"; poweroff -f; }
mount -t tmpfs -o mode=0755 tmpfs /ovl
mkdir -p /ovl/upper /ovl/work
mount -t overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work overlay /newroot
for d in proc sys dev; do mount --move /$d /newroot/$d; done
# /tmp stays the overlay's (host files visible, writes kept in the guest): the host's checkout
# and virtual environment may well live under /tmp. /run starts empty, as after a boot.
mount -t tmpfs tmpfs /newroot/run
mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null
mkdir -p /newroot/dev/pts && mount -t devpts devpts /newroot/dev/pts
i=0
for d in $(echo "$RW" | tr ',' ' '); do
  mkdir -p "/newroot$d" && mount -t 9p -o NINEP_OPTS "rw$i" "/newroot$d"; i=$((i+1))
done
rel=$(uname -r)
rm -rf "/newroot/usr/lib/modules/$rel"; mkdir -p /newroot/usr/lib/modules
ln -s "$MODS" "/newroot/usr/lib/modules/$rel"
hostname livesplice-guest
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
exec switch_root /newroot "$PY" -S "$AGENT"
""".replace("NINEP_OPTS", NINEP_OPTS)


def _module_load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Relative paths of `wanted` and their dependencies, each after what it needs (modules.dep;
    the files may be compressed: .ko.xz in the 6.12 line)."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[debian.module_name(mod)] = mod
    builtin = {debian.module_name(line)
               for line in (modules_dir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in deps.get(mod, []):
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name in builtin:
            continue
        if name not in by_name:
            raise LivespliceError(f"kernel module {name} not found in {modules_dir}")
        visit(by_name[name])
    return order


def build_initramfs(files: debian.KernelFiles) -> Path:
    """An uncompressed newc cpio (TCG decompresses slowly), cached per kernel and init script."""
    import hashlib
    agent = Path(__file__).with_name("guest_agent.py").read_bytes()
    tag = hashlib.sha256(INIT_SCRIPT.encode() + repr(INITRAMFS_MODULES).encode() + agent
                         + AGENT_UNIT.encode()).hexdigest()[:12]
    out = debian.cache_root() / "initramfs" / f"{files.kernel.abi}-{tag}.cpio"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    order = _module_load_order(files.modules, INITRAMFS_MODULES)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "sbin", "proc", "sys", "dev", "modules", "usr/bin", "usr/sbin"):
            (root / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for applet in applets:
            link = root / applet
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to("/bin/busybox")
        # Decompressed: busybox's insmod loads plain ELF images only.
        names = [f"{debian.module_name(m)}.ko" for m in order]
        for mod, name in zip(order, names):
            (root / "modules" / name).write_bytes(debian.read_module(files.modules / mod))
        (root / "modules.load").write_text("\n".join(names) + "\n")
        (root / "guest_agent.py").write_bytes(agent)
        (root / "agent.service").write_text(AGENT_UNIT)
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        listing = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        part = out.with_suffix(".part")
        with open(part, "wb") as f:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                           input=listing, stdout=f, check=True)
        part.rename(out)
    return out


# The agent as a service of a system disk's systemd: up once the system is (multi-user).
AGENT_UNIT = """[Unit]
Description=livesplice test bed agent (runs the host's commands)
After=systemd-udevd.service systemd-journald.socket

[Service]
ExecStart=/usr/bin/python3 -S /usr/local/lib/livesplice/guest_agent.py
Environment=PATH=/opt/livesplice/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
Environment=HOME=/root LANG=C.UTF-8
Restart=on-failure
"""


# --- the session -------------------------------------------------------------------------------

@dataclass
class Session:
    """A booted guest. Use as a context manager; `run` executes a command in it as root."""

    kernel: str = debian.DEFAULT_KERNEL
    cpus: int = 2
    memory: str = "1G"
    rwdirs: list[str] = field(default_factory=list)
    boot_timeout: float = 180.0
    append: str = ""  # more of the kernel command line (e.g. "spectre_v2=retpoline retbleed=stuff")
    # QEMU's CPU model (-cpu): it decides which mitigations the kernel picks and so which code it
    # rewrites at boot (call depth tracking wants an Intel model such as Skylake-Client).
    cpu: str = DEFAULT_CPU
    # A system disk (sysimage.new_disk): boot it with systemd as init instead of this machine's
    # root; its state lasts from one session to the next.
    disk: Path | None = None
    # With a disk: sshd's port 22 forwarded from 127.0.0.1:ssh_port; the guest reaches nothing.
    ssh_port: int | None = None

    def __post_init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.boot_seconds: float | None = None

    # lifecycle

    def __enter__(self) -> Session:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def console_path(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name) / "console.log"

    def start(self) -> None:
        require_host()
        files = debian.kernel_files(self.kernel)
        if not debian.is_fetched(self.kernel) and not files.vmlinuz.exists():
            raise BadInput(f"kernel {self.kernel} is not fetched: run `livesplice vm fetch "
                           f"--kernel {self.kernel}` first")
        initrd = build_initramfs(files)
        self._tmp = tempfile.TemporaryDirectory(prefix="livesplice-vm-")
        sock_path = Path(self._tmp.name) / "agent.sock"
        rwdirs = [str(Path(d).resolve()) for d in self.rwdirs]
        for d in rwdirs:
            if not os.path.isdir(d) or "," in d or " " in d:
                raise BadInput(f"--rwdir {d!r}: must be an existing directory without ',' or spaces")
        agent = Path(__file__).with_name("guest_agent.py").resolve()
        cmdline = " ".join([
            "console=ttyS0", "quiet", "panic=-1", "rdinit=/init", "tsc=reliable", "no_timer_check",
            "mitigations=auto",
            f"livesplice.python={sys.executable}", f"livesplice.agent={agent}",
            f"livesplice.modules={files.modules}", f"livesplice.rwdirs={','.join(rwdirs)}",
            *(["livesplice.disk=1"] if self.disk is not None else []),
            self.append,
        ])
        argv = [qemu_binary(), "-accel", "tcg", "-cpu", self.cpu, "-smp", str(self.cpus),
                "-m", self.memory, "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-kernel", str(files.vmlinuz), "-initrd", str(initrd),
                "-append", cmdline,
                "-chardev", f"file,id=con,path={self.console_path}", "-serial", "chardev:con",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=agent,path={sock_path},server=on,wait=off",
                "-device", "virtserialport,chardev=agent,name=livesplice.agent"]
        if self.disk is None:
            argv += ["-fsdev", "local,id=hostroot,path=/,security_model=passthrough,readonly=on,"
                               "multidevs=remap",
                     "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"]
        else:
            argv += ["-drive", f"file={self.disk},if=virtio,format=qcow2",
                     "-fsdev", f"local,id=modules,path={files.modules},security_model=passthrough,"
                               "readonly=on,multidevs=remap",
                     "-device", "virtio-9p-pci,fsdev=modules,mount_tag=modules"]
            if self.ssh_port is not None:
                # restrict=on: the guest reaches no address at all, only the forward comes in
                argv += ["-netdev", f"user,id=net,restrict=on,"
                                    f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                         "-device", "virtio-net-pci,netdev=net"]
        for i, d in enumerate(rwdirs):
            argv += ["-fsdev", f"local,id=rw{i},path={d},security_model=passthrough,multidevs=remap",
                     "-device", f"virtio-9p-pci,fsdev=rw{i},mount_tag=rw{i}"]
        started = time.monotonic()
        log.info("booting %s under QEMU (%d CPUs of model %s, %s)", self.kernel, self.cpus,
                 self.cpu, self.memory)
        log.debug("QEMU: %s", " ".join(argv))
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT)
        deadline = started + self.boot_timeout
        while not sock_path.exists():
            self._check_alive("while starting QEMU")
            if time.monotonic() > deadline:
                self._fail(GuestHung, "QEMU did not create its agent socket")
            time.sleep(0.02)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(sock_path))
        hello = self._read_message(deadline, "while booting")
        if not hello.get("ready"):
            self._fail(GuestError, f"unexpected first message from the agent: {hello!r}")
        self.boot_seconds = time.monotonic() - started
        log.info("the guest is up (%.1f s)", self.boot_seconds)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                self._send({"poweroff": True})
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # commands

    def run(self, argv: list[str] | str, timeout: float = 60.0, check: bool = False,
            env: dict[str, str] | None = None, cwd: str | None = None) -> Result:
        """Run argv (or a shell command line) in the guest as root and return its result.

        Raises CommandTimeout (the guest killed it; the session stays usable), GuestPanic or
        GuestHung (the session is over), or LivespliceError with `check` and a non-zero status.
        """
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        if self._proc is None:
            raise LivespliceError("the test-bed session is not running")
        self._next_id += 1
        log.debug("guest runs %r", argv)
        request = {"id": self._next_id, "argv": list(argv), "timeout": timeout, "env": env or {},
                   "cwd": cwd}
        self._send(request)
        # The agent enforces the timeout; past it plus a grace period the guest itself is stuck.
        reply = self._read_message(time.monotonic() + timeout + 30, f"running {argv!r}")
        stdout = base64.b64decode(reply["stdout"])
        stderr = base64.b64decode(reply["stderr"])
        if reply.get("timed_out"):
            raise CommandTimeout(argv, timeout, stdout, stderr)
        result = Result(argv, reply["status"], stdout, stderr)
        if check and result.status != 0:
            raise LivespliceError(f"{argv!r} exited {result.status}: {result.err.strip()}")
        return result

    def dmesg(self) -> str:
        return self.run(["dmesg"], check=True).out

    def dmesg_problems(self, since: int = 0) -> list[str]:
        """Lines of the kernel log (from line `since` on) that report an oops, BUG or warning."""
        return [line for line in self.dmesg().splitlines()[since:] if BAD_DMESG.search(line)]

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    # plumbing

    def _send(self, message: dict) -> None:
        assert self._sock is not None
        self._sock.sendall((json.dumps(message) + "\n").encode())

    def _read_message(self, deadline: float, doing: str) -> dict:
        assert self._sock is not None
        while b"\n" not in self._buf:
            self._check_alive(doing)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(GuestHung, f"guest hung {doing}: no answer in time")
            self._sock.settimeout(min(remaining, 0.5))
            try:
                chunk = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                self._check_alive(doing)
                time.sleep(0.05)
                continue
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _check_alive(self, doing: str) -> None:
        assert self._proc is not None
        if self._proc.poll() is None:
            return
        console = self.console()
        qemu_out = self._proc.stdout.read().decode(errors="replace") if self._proc.stdout else ""
        if "Kernel panic" in console:
            self._fail(GuestPanic, f"guest kernel panicked {doing}")
        self._fail(GuestError, f"QEMU exited ({self._proc.returncode}) {doing}: {qemu_out.strip()}")

    def _fail(self, kind: type[GuestError], message: str) -> None:
        console = self.console()
        tail = "\n".join(console.splitlines()[-60:])
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        raise kind(message, tail)
