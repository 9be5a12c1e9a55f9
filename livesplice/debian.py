"""Stock Debian 12 kernels: which ones livesplice knows, and fetching them into the cache.

Everything is taken from Debian's package registry with apt's own client, `apt-get download` (so
the machine's apt configuration decides the mirror, proxy and credentials), unpacked with
dpkg-deb, never installed: several kernels and their headers live side by side in the cache, and
the host's /boot and /lib/modules stay untouched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadInput, LivespliceError

# The command line imports this module for the kernels' names; rich.progress, which only
# fetching needs, is imported when fetching (with urllib.request, it took 0.5 s of every
# command's start in an emulated guest).
if TYPE_CHECKING:
    from rich.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StockKernel:
    """A stock Debian kernel. Two naming schemes: the 6.1 line's releases carry an ABI number
    (6.1.0-53-amd64, Debian version 6.1.187-1), the 6.12 line's the upstream version and the
    suite (6.12.111+deb12-amd64, Debian version 6.12.111-1~deb12u1)."""

    abi: str  # e.g. 6.1.0-53-amd64, the kernel release `uname -r` prints
    version: str  # Debian package version of the image, headers and source, e.g. 6.1.187-1

    @property
    def image_package(self) -> str:
        return f"linux-image-{self.abi}"

    @property
    def abi_number(self) -> str:
        return self.abi.rsplit("-", 1)[0]  # 6.1.0-53, 6.12.111+deb12

    @property
    def line(self) -> str:
        """The upstream kernel line, MAJOR.MINOR: 6.1, 6.12."""
        return ".".join(self.version.split(".")[:2])

    @property
    def upstream_version(self) -> str:
        """The upstream kernel version: 6.1.187, 6.12.111."""
        return self.version.split("-", 1)[0]

    @property
    def source_package(self) -> str:
        """The package whose tarball holds the source (Debian's patches applied): one per line."""
        return f"linux-source-{self.line}"

    @property
    def source_tarball(self) -> str:
        """Its path inside that package."""
        return f"usr/src/{self.source_package}.tar.xz"

    @property
    def header_packages(self) -> list[str]:
        """What the kbuild tree for external modules takes, each as PKG[=VERSION] for apt: the
        flavour's headers, the common headers, and the host tools (linux-kbuild-6.1 exists once,
        any version >= the kernel's will do; the 6.12 line has one linux-kbuild per release)."""
        kbuild = ("linux-kbuild-6.1" if self.line == "6.1"
                  else f"linux-kbuild-{self.abi_number}={self.version}")
        return [f"linux-headers-{self.abi}={self.version}",
                f"linux-headers-{self.abi_number}-common={self.version}", kbuild]


# The stock kernels this project is tested against (see shared/testbed-facts.md).
KNOWN_KERNELS: dict[str, StockKernel] = {
    k.abi: k
    for k in (
        StockKernel("6.1.0-53-amd64", "6.1.187-1"),
        StockKernel("6.1.0-54-amd64", "6.1.190-1"),
        StockKernel("6.1.0-55-amd64", "6.1.192-1"),
        StockKernel("6.1.0-56-amd64", "6.1.192-2"),
        # The 6.12 line (Debian 13's, built for Debian 12 in bookworm-security): IBT, call
        # padding, call depth tracking (docs: issue 12).
        StockKernel("6.12.107+deb12-amd64", "6.12.107-1~deb12u1"),
        StockKernel("6.12.111+deb12-amd64", "6.12.111-1~deb12u1"),
        StockKernel("6.12.113+deb12-amd64", "6.12.113-1~deb12u1"),
        StockKernel("6.12.115+deb12-amd64", "6.12.115-2~deb12u1"),
        StockKernel("6.12.117+deb12-amd64", "6.12.117-1~deb12u1"),
    )
}
DEFAULT_KERNEL = "6.1.0-53-amd64"
# The kernel each line's tests boot by default.
DEFAULT_KERNELS = {"6.1": DEFAULT_KERNEL, "6.12": "6.12.111+deb12-amd64"}


def cache_root() -> Path:
    """~/.cache/livesplice, or $XDG_CACHE_HOME/livesplice; $LIVESPLICE_CACHE overrides both."""
    if os.environ.get("LIVESPLICE_CACHE"):
        return Path(os.environ["LIVESPLICE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "livesplice"


def lookup_kernel(abi: str) -> StockKernel:
    try:
        return KNOWN_KERNELS[abi]
    except KeyError:
        known = ", ".join(sorted(KNOWN_KERNELS))
        raise BadInput(f"unknown kernel {abi!r}; livesplice knows: {known}") from None


def kernel_for_source_version(version: str) -> StockKernel:
    for k in KNOWN_KERNELS.values():
        if k.version == version:
            return k
    known = ", ".join(sorted(k.version for k in KNOWN_KERNELS.values()))
    raise BadInput(f"unknown Debian source version {version!r}; livesplice knows: {known}")


@dataclass(frozen=True)
class KernelFiles:
    """Where a fetched stock kernel lives in the cache."""

    kernel: StockKernel
    root: Path  # the image package unpacked

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.kernel.abi}"

    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.kernel.abi}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.kernel.abi

    @property
    def headers(self) -> Path:
        """The kbuild tree for external modules (what /lib/modules/ABI/build points at)."""
        return headers_root(self.kernel) / "usr" / "src" / f"linux-headers-{self.kernel.abi}"

    @property
    def build_id_file(self) -> Path:
        """Where image_build_id keeps the image's build id, once computed."""
        return self.root / f"vmlinux-{self.kernel.abi}.build-id"

    @property
    def source_tree(self) -> Path:
        return source_root(self.kernel.version) / self.kernel.source_package


def kernel_root(kernel: StockKernel) -> Path:
    return cache_root() / "kernels" / kernel.abi


def headers_root(kernel: StockKernel) -> Path:
    return cache_root() / "headers" / kernel.abi


def source_root(version: str) -> Path:
    return cache_root() / "sources" / version


def kernel_files(abi: str) -> KernelFiles:
    kernel = lookup_kernel(abi)
    return KernelFiles(kernel, kernel_root(kernel))


def is_fetched(abi: str) -> bool:
    files = kernel_files(abi)
    return all((p / ".complete").exists()
               for p in (files.root, headers_root(files.kernel), source_root(files.kernel.version)))


# --- downloading -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DebUri:
    url: str
    filename: str
    size: int
    sha256: str | None


def _apt_uri(spec: str) -> DebUri:
    """Ask apt where PKG[=VERSION] is, without downloading it (apt-get download --print-uris)."""
    if not shutil.which("apt-get"):
        raise BadInput("apt-get is not available: livesplice fetches stock kernels from Debian's registry")
    proc = subprocess.run(["apt-get", "download", "--print-uris", spec],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        hint = " (run scripts/setup.sh, or `apt-get update`, first)" if "not found" in proc.stderr \
            or "Unable to locate" in proc.stderr else ""
        raise BadInput(f"apt cannot find {spec}{hint}: {proc.stderr.strip()}")
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith("'"):
            sha = None
            if len(parts) >= 4 and parts[3].upper().startswith("SHA256:"):
                sha = parts[3].split(":", 1)[1]
            return DebUri(parts[0].strip("'"), parts[1], int(parts[2]), sha)
    raise LivespliceError(f"apt printed no URI for {spec}: {proc.stdout!r}")


def _download(spec: str, dest_dir: Path) -> Path:
    """PKG=VERSION's .deb in `dest_dir`, downloaded by apt's own client (`apt-get download`) so
    that apt's configuration applies (mirror, proxy, auth.conf credentials, timeouts), and checked
    by apt against the hashes of its signed index; kept there, so the next fetch reuses it."""
    uri = _apt_uri(spec)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / uri.filename
    if dest.exists() and dest.stat().st_size == uri.size and \
            (uri.sha256 is None or _sha256(dest) == uri.sha256):
        log.info("%s: already downloaded", uri.filename)
        return dest
    dest.unlink(missing_ok=True)  # an interrupted download: apt starts again
    log.info("downloading %s (%.1f MB) with apt-get", uri.filename, uri.size / 1e6)
    # apt's progress goes to stderr: stdout may be carrying a --json result.
    proc = subprocess.run(["apt-get", "download", spec], cwd=dest_dir, stdout=2,
                          stderr=subprocess.PIPE, text=True, check=False)
    problems = []
    for line in proc.stderr.splitlines():
        # apt's unprivileged _apt user cannot write into root's cache: apt downloads as root,
        # which is what livesplice runs as anyway.
        if "Download is performed unsandboxed as root" in line:
            log.debug("apt: %s", line)
        elif line.strip():
            problems.append(line.strip())
    if proc.returncode != 0 or not dest.exists():
        raise BadInput(f"apt could not download {spec} (exit status {proc.returncode}; check "
                       "apt's configuration, mirror and proxy, and the network): "
                       + " ".join(problems))
    for line in problems:
        log.warning("apt: %s", line)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _unpack_deb(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)


def _unpack_tarball(tarball: Path, dest: Path, progress: Progress) -> None:
    """tar -xJ, fed through Python so that the bar follows the compressed bytes read."""
    dest.mkdir(parents=True, exist_ok=True)
    task = progress.add_task(f"unpack {tarball.name}", total=tarball.stat().st_size)
    tar = subprocess.Popen(["tar", "-xJf", "-", "-C", str(dest)], stdin=subprocess.PIPE)
    assert tar.stdin is not None
    with open(tarball, "rb") as f:
        while chunk := f.read(1 << 20):
            tar.stdin.write(chunk)
            progress.advance(task, len(chunk))
    tar.stdin.close()
    if tar.wait() != 0:
        raise LivespliceError(f"unpacking {tarball} failed")


def _fix_headers_links(root: Path, kernel: StockKernel) -> None:
    """Debian's headers point at /usr/lib/linux-kbuild-* and /usr/src/linux-headers-*-common with
    absolute links and an absolute include; re-aim those into this unpacked copy."""
    for makefile in (root / "usr" / "src").glob("linux-headers-*/Makefile"):
        text = makefile.read_text()
        makefile.write_text(text.replace("include /usr/src/", f"include {root}/usr/src/"))
    for path in root.rglob("*"):
        if path.is_symlink():
            target = os.readlink(path)
            if target.startswith("/"):
                inside = root / target.lstrip("/")
                path.unlink()
                path.symlink_to(inside)


def _progress() -> Progress:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), transient=True)


def fetch_kernel(abi: str, with_source: bool = True) -> KernelFiles:
    """Download and unpack a stock kernel's image, headers and (optionally) source. Idempotent."""
    files = kernel_files(abi)
    kernel = files.kernel
    debs = cache_root() / "debs"
    if not (files.root / ".complete").exists():
        deb = _download(f"{kernel.image_package}={kernel.version}", debs)
        log.info("unpacking %s", deb.name)
        shutil.rmtree(files.root, ignore_errors=True)
        _unpack_deb(deb, files.root)
        # modules.dep for the unpacked tree, so initramfs building can follow dependencies.
        subprocess.run(["depmod", "-b", str(files.root), kernel.abi], check=True)
        (files.root / ".complete").touch()

    hroot = headers_root(kernel)
    if not (hroot / ".complete").exists():
        pkgs = [_download(s, debs) for s in kernel.header_packages]
        log.info("unpacking the headers of %s", kernel.abi)
        shutil.rmtree(hroot, ignore_errors=True)
        for deb in pkgs:
            _unpack_deb(deb, hroot)
        _fix_headers_links(hroot, kernel)
        (hroot / ".complete").touch()

    sroot = source_root(kernel.version)
    if with_source and not (sroot / ".complete").exists():
        deb = _download(f"{kernel.source_package}={kernel.version}", debs)
        shutil.rmtree(sroot, ignore_errors=True)
        unpacked = sroot / "deb"
        _unpack_deb(deb, unpacked)
        with _progress() as progress:
            _unpack_tarball(unpacked / kernel.source_tarball, sroot, progress)
        shutil.rmtree(unpacked)
        (sroot / ".complete").touch()
    return files


def image_version(vmlinuz: Path) -> str:
    """The version banner a bzImage carries in its setup header (boot protocol: kernel_version),
    e.g. '6.1.0-53-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.187-1
    (2025-...)': /proc/version of that kernel holds the same release, builder and version."""
    data = vmlinuz.read_bytes()[:0x10000]
    if data[0x202:0x206] != b"HdrS":
        raise LivespliceError(f"{vmlinuz} is not a bzImage")
    pointer = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    return data[pointer:data.index(b"\0", pointer)].decode(errors="replace")


def image_build_id(files: KernelFiles) -> str | None:
    """The GNU build id of a stock image's vmlinux (what its /sys/kernel/notes shows), from the
    bzImage's payload; computed once and kept next to the unpacked image."""
    from .buildid import bzimage_vmlinux, elf_build_id

    cached = files.build_id_file
    if cached.exists():
        text = cached.read_text().strip()
        return text or None
    build_id = elf_build_id(bzimage_vmlinux(files.vmlinuz.read_bytes()))
    try:
        part = cached.with_name(cached.name + ".part")
        part.write_text((build_id or "") + "\n")
        part.rename(cached)
    except OSError:
        pass  # a read-only cache: compute it again next time
    return build_id


# --- compiled modules ----------------------------------------------------------------------------

# How a stock kernel's modules may be compressed (the 6.12 line's are .ko.xz; the 6.1 line's .ko).
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str | Path) -> str:
    """The module's name from its file's: kernel/fs/9p/9p.ko.xz -> 9p, dm-mod.ko -> dm_mod."""
    name = Path(path).name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    return name.replace("-", "_")


def module_file(modules_dir: Path, path: str) -> Path | None:
    """The compiled module at `path` (without .ko, relative to modules_dir) as it is there,
    compressed or not; None if there is none."""
    for suffix in MODULE_SUFFIXES:
        candidate = modules_dir / f"{path}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_module(path: Path) -> bytes:
    """A compiled module's ELF image, decompressed if its file is (.ko.xz, .ko.zst, .ko.gz)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        import lzma
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        import gzip
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=False)
        if proc.returncode != 0:
            raise LivespliceError(f"cannot decompress {path}: {proc.stderr.decode(errors='replace')}")
        return proc.stdout
    return data
