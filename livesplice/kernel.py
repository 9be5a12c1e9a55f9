"""The running kernel, as root sees it: symbols (/proc/kallsyms), memory (/proc/kcore), loaded
modules (/sys/module); linking a module against the kernel's unexported symbols."""

from __future__ import annotations

import bisect
import os
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput, LivespliceError

SHN_ABS = 0xFFF1


@dataclass(frozen=True)
class KSym:
    address: int
    type: str  # nm-style: t/T text, d/D data, b/B bss, r/R read-only
    name: str
    module: str | None

    @property
    def is_text(self) -> bool:
        return self.type in "tTwW"

    @property
    def is_global(self) -> bool:
        return self.type.isupper()


class Kallsyms:
    def __init__(self, text: str | None = None):
        if text is None:
            text = Path("/proc/kallsyms").read_text()
        self.by_name: dict[str, list[KSym]] = {}
        addresses = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            module = parts[3].strip("[]") if len(parts) > 3 else None
            sym = KSym(int(parts[0], 16), parts[1], parts[2], module)
            self.by_name.setdefault(sym.name, []).append(sym)
            if sym.is_text:
                addresses.append(sym.address)
        if all(s.address == 0 for s in self.by_name.get("_stext", [])):
            raise BadInput("/proc/kallsyms shows no addresses: run as root "
                           "(and with kernel.kptr_restrict < 2)")
        self._text = sorted(set(addresses))

    def lookup(self, name: str, module: str | None = None) -> list[KSym]:
        return [s for s in self.by_name.get(name, []) if s.module == module]

    def address(self, name: str) -> int:
        syms = self.lookup(name)
        if len(syms) != 1:
            raise LivespliceError(f"{name}: {len(syms)} symbols of that name in /proc/kallsyms")
        return syms[0].address

    def next_text_after(self, address: int) -> int | None:
        i = bisect.bisect_right(self._text, address)
        return self._text[i] if i < len(self._text) else None


class KernelMemory:
    """Reads kernel virtual memory through /proc/kcore's PT_LOAD segments."""

    def __init__(self, path: str = "/proc/kcore"):
        try:
            self._f = open(path, "rb")
        except OSError as exc:
            raise BadInput(f"cannot open {path} ({exc.strerror}): run as root on a kernel with "
                           "CONFIG_PROC_KCORE") from None
        header = self._f.read(64)
        if header[:4] != b"\x7fELF":
            raise LivespliceError(f"{path} is not an ELF core file")
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        self._f.seek(phoff)
        table = self._f.read(phentsize * phnum)
        self.segments = []
        for i in range(phnum):
            p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from(
                "<IIQQQQQQ", table, i * phentsize)
            if p_type == 1:  # PT_LOAD
                self.segments.append((p_vaddr, p_filesz, p_offset))

    def read(self, address: int, size: int) -> bytes:
        for vaddr, filesz, offset in self.segments:
            if vaddr <= address and address + size <= vaddr + filesz:
                self._f.seek(offset + address - vaddr)
                data = self._f.read(size)
                if len(data) == size:
                    return data
        raise LivespliceError(f"kernel address {address:#x}+{size} is not readable in /proc/kcore")

    def close(self) -> None:
        self._f.close()


def require_root() -> None:
    if os.geteuid() != 0:
        raise BadInput("this command changes or inspects the running kernel: run it as root")


def running_release() -> str:
    return os.uname().release


def proc_version() -> str:
    return Path("/proc/version").read_text().strip()


def module_loaded(name: str) -> bool:
    return Path(f"/sys/module/{name}").is_dir()


def module_section(name: str, section: str) -> int:
    return int(Path(f"/sys/module/{name}/sections/{section}").read_text(), 16)


def insmod(path: Path, *params: str) -> None:
    proc = subprocess.run(["insmod", str(path), *params], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LivespliceError(f"insmod {path.name} failed: {proc.stderr.strip()}")


def rmmod(name: str) -> None:
    proc = subprocess.run(["rmmod", name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LivespliceError(f"rmmod {name} failed: {proc.stderr.strip()}")


def link_unexported(ko: bytes, kallsyms: Kallsyms, names: dict[str, int] | None = None) -> bytes:
    """The module with undefined symbols made absolute: those in `names` at the address given,
    and every one the kernel does not export at its (unique) vmlinux address in kallsyms. The
    module loader then leaves them as they are, as for any SHN_ABS symbol; exported ones it
    resolves itself, with their version checks."""
    import io

    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(ko))
    symtab = elf.get_section_by_name(".symtab")
    out = bytearray(ko)
    missing = []
    for i, sym in enumerate(symtab.iter_symbols()):
        if not sym.name or sym["st_shndx"] != "SHN_UNDEF":
            continue
        if names is not None and sym.name in names:
            address = names[sym.name]
        elif kallsyms.by_name.get("__ksymtab_" + sym.name):
            continue
        else:
            candidates = kallsyms.lookup(sym.name)  # vmlinux's
            found = [c for c in candidates if c.is_global] or candidates
            if len(found) != 1:
                missing.append(sym.name)
                continue
            address = found[0].address
        entry = symtab["sh_offset"] + i * symtab["sh_entsize"]
        struct.pack_into("<HQ", out, entry + 6, SHN_ABS, address)
    if missing:
        raise LivespliceError("the running kernel has no single symbol for "
                              + ", ".join(sorted(missing)))
    return bytes(out)


KERNEL_NOTES = Path("/sys/kernel/notes")


def running_build_id() -> str | None:
    """The running kernel's GNU build id (vmlinux's, lower-case hex), None if it shows none."""
    from .buildid import gnu_build_id

    try:
        return gnu_build_id(KERNEL_NOTES.read_bytes())
    except FileNotFoundError:
        return None


def module_build_id(name: str) -> str | None:
    """A loaded module's GNU build id, None if the module is not loaded or has none."""
    from .buildid import gnu_build_id

    try:
        return gnu_build_id(Path(f"/sys/module/{name}/notes/.note.gnu.build-id").read_bytes())
    except FileNotFoundError:
        return None


TRACEFS = Path("/sys/kernel/tracing")


def ipmodify_functions() -> set[str]:
    """Functions an ftrace user already redirects (livepatch, kpatch, BPF trampolines with
    IPMODIFY): ftrace's `enabled_functions` flags them ` I`. Their callers never reach a jump
    written after the fentry site."""
    listing = TRACEFS / "enabled_functions"
    if not listing.exists() and not os.path.ismount(TRACEFS):
        subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS)], capture_output=True)
    try:
        text = listing.read_text()
    except OSError:
        return set()
    out = set()
    for line in text.splitlines():
        head, _, flags = line.partition(")")
        if " I" in flags.split("tramp:")[0] and head.split():
            out.add(head.split()[0])
    return out
