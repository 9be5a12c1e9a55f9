"""The running kernel, as root sees it: symbols (/proc/kallsyms), memory (/proc/kcore), loaded
modules (/sys/module); linking a module against the kernel's unexported symbols."""

from __future__ import annotations

import bisect
import errno
import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput, LivespliceError, Refused

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


KALLSYMS = Path("/proc/kallsyms")
_EXPORT = re.compile(rb" __ksymtab_(\S+)[\t\n]")  # EXPORT_SYMBOL's entry, vmlinux's or a module's
_TEXT_ADDRESS = re.compile(rb"^([0-9a-fA-F]+) [tTwW] ", re.MULTILINE)


def _name_field(name: str) -> bytes | None:
    """The name as /proc/kallsyms would show it; None for one it cannot show (kallsyms names are
    ASCII, without white space)."""
    try:
        field = name.encode("ascii")
    except UnicodeEncodeError:
        return None
    return field if field.split() == [field] else None


class Kallsyms:
    """The running kernel's symbols, as /proc/kallsyms lists them: vmlinux's (module None) first,
    then each module's, `ADDRESS TYPE NAME\t[MODULE]`.

    The text is read once, as bytes, and searched only for the names asked for: an update needs a
    few dozen of its 100,000-odd lines, and parsing them all cost seconds in an emulated guest.
    A name is found with bytes.find of " NAME" followed by a newline (vmlinux) or a tab (a
    module), the only places a field preceded by a space ends so; each answer is kept."""

    def __init__(self, text: bytes | str | None = None):
        if text is None:
            text = KALLSYMS.read_bytes()
        elif isinstance(text, str):
            text = text.encode()
        self._text = text if text.endswith(b"\n") else text + b"\n"
        # vmlinux's lines come first and have no tab; modules', ftrace's and BPF's follow.
        first_tab = self._text.find(b"\t")
        self._modules_start = (len(self._text) if first_tab < 0
                               else self._text.rfind(b"\n", 0, first_tab) + 1)
        self._by_name: dict[str, list[KSym]] = {}
        self._exported: frozenset[bytes] | None = None
        self._text_addresses: list[int] | None = None
        if all(s.address == 0 for s in self._find("_stext") if s.module is None):
            raise BadInput("/proc/kallsyms shows no addresses: run as root "
                           "(and with kernel.kptr_restrict < 2)")

    def symbols(self, name: str) -> list[KSym]:
        """Every symbol of that name, vmlinux's and modules', in /proc/kallsyms' order."""
        found = self._by_name.get(name)
        if found is None:
            found = self._by_name[name] = self._find(name)
        return found

    def _find(self, name: str) -> list[KSym]:
        field = _name_field(name)
        if field is None:
            return []
        text = self._text
        out = []
        for end, start, stop in ((b"\n", 0, self._modules_start),
                                 (b"\t", self._modules_start, len(text))):
            needle = b" " + field + end
            at = text.find(needle, start, stop)
            while at >= 0:
                line = text.rfind(b"\n", 0, at) + 1
                head = text[line:at].split()  # address and type
                if len(head) == 2 and len(head[1]) == 1:
                    module = None
                    if end == b"\t":  # then "[MODULE]"
                        after = at + len(needle)
                        module = text[after:text.find(b"\n", after)].strip(b"[]").decode()
                    out.append(KSym(int(head[0], 16), head[1].decode(), name, module))
                at = text.find(needle, at + len(needle), stop)
        return out

    def lookup(self, name: str, module: str | None = None) -> list[KSym]:
        """The symbols of that name in vmlinux (module None) or in that module."""
        return [s for s in self.symbols(name) if s.module == module]

    def address(self, name: str) -> int:
        syms = self.lookup(name)
        if len(syms) != 1:
            raise LivespliceError(f"{name}: {len(syms)} symbols of that name in /proc/kallsyms")
        return syms[0].address

    def exported(self, name: str) -> bool:
        """Whether vmlinux or a loaded module exports `name` (has its `__ksymtab_NAME`): the
        module loader resolves those itself. The set of all of them is one regex pass."""
        if self._exported is None:
            self._exported = frozenset(_EXPORT.findall(self._text))
        return _name_field(name) in self._exported

    def next_text_after(self, address: int) -> int | None:
        """The lowest address of a text symbol above `address` (where a function ends, at the
        latest). The sorted addresses of all text symbols are made on the first call."""
        if self._text_addresses is None:
            self._text_addresses = sorted({int(a, 16) for a in _TEXT_ADDRESS.findall(self._text)})
        i = bisect.bisect_right(self._text_addresses, address)
        return self._text_addresses[i] if i < len(self._text_addresses) else None


class KernelMemory:
    """Reads kernel virtual memory through /proc/kcore's PT_LOAD segments."""

    def __init__(self, path: str = "/proc/kcore"):
        try:
            self._f = open(path, "rb", buffering=0)  # no cache: memory changes under us
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
                data = b""
                while len(data) < size:  # unbuffered: a read may return less
                    chunk = os.pread(self._f.fileno(), size - len(data),
                                     offset + address - vaddr + len(data))
                    if not chunk:
                        break
                    data += chunk
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


# What kmod's insmod says for the errors whose strerror misleads.
_LOAD_ERRORS = {errno.ENOEXEC: "Invalid module format",
                errno.ENOENT: "Unknown symbol in module, or unknown parameter (see dmesg)",
                errno.EEXIST: "a module of that name is already loaded"}


def cmdline_options(name: str, cmdline: str | None = None) -> str:
    """The options the kernel command line (/proc/cmdline) gives module `name`, as `NAME.PARAM`
    or `NAME.PARAM=VALUE` (`-` and `_` alike in NAME), in init_module(2)'s form. The kernel
    applies these to built-in code only; for a module it is modprobe that passes them, and
    insmod, as init_module(2) itself, does not."""
    if cmdline is None:
        cmdline = Path("/proc/cmdline").read_text()
    # The kernel's own split (lib/cmdline.c next_arg): at white space outside double quotes.
    words = re.findall(r'(?:[^\s"]|"[^"]*"?)+', cmdline)
    wanted = name.replace("-", "_")
    out = []
    for word in words:
        word = word.replace('"', "")
        module, dot, option = word.partition(".")
        if not dot or not option or module.replace("-", "_") != wanted:
            continue
        param, eq, value = option.partition("=")
        out.append(f'{param}="{value}"' if eq and any(c.isspace() for c in value) else option)
    return " ".join(out)


def insmod(name: str, image: bytes, params: str = "") -> None:
    """Load a module from its bytes with init_module(2), as insmod does; in-process, because
    starting insmod cost about 0.3 s per module in an emulated guest. The kernel command line's
    options for it come first, as modprobe passes them (`livesplice_core.refuse_mismatch=0`)."""
    import ctypes

    params = " ".join(p for p in (cmdline_options(name), params) if p)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.init_module(image, ctypes.c_ulong(len(image)), params.encode()) != 0:
        code = ctypes.get_errno()
        raise LivespliceError(f"insmod {name}.ko failed: {_LOAD_ERRORS.get(code, os.strerror(code))}")


def rmmod(name: str) -> None:
    proc = subprocess.run(["rmmod", name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LivespliceError(f"rmmod {name} failed: {proc.stderr.strip()}")


# The x86-64 ELF records read with struct (here, and by create's module stage on .ko files).
ELF64_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size
ELF64_SECTION = struct.Struct("<IIQQQQIIQQ")  # sh_name, sh_type, ..., sh_offset, sh_size, sh_link, ...
ELF64_RELA = struct.Struct("<QQq")  # r_offset, r_info, r_addend
SHT_SYMTAB = 2
SHN_UNDEF = 0


def undefined_symbols(ko: bytes, what: str = "module") -> list[tuple[int, str]]:
    """(offset of its Elf64_Sym in `ko`, name) of each named undefined symbol of a relocatable
    x86-64 ELF object. Read with struct, not pyelftools, whose parsing and import took about a
    second per apply in an emulated guest; the table is the one the kernel's loader reads."""
    try:
        if ko[:4] != b"\x7fELF" or ko[4:6] != b"\x02\x01":
            raise ValueError("not a 64-bit little-endian ELF file")
        shoff, = struct.unpack_from("<Q", ko, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", ko, 0x3A)
        if shentsize != ELF64_SECTION.size:
            raise ValueError(f"section headers of {shentsize} bytes")
        sections = [ELF64_SECTION.unpack_from(ko, shoff + i * shentsize) for i in range(shnum)]
        symtabs = [s for s in sections if s[1] == SHT_SYMTAB]
        if len(symtabs) != 1:
            raise ValueError(f"{len(symtabs)} symbol tables")
        _, _, _, _, offset, size, link, _, _, entsize = symtabs[0]
        if entsize != ELF64_SYM.size or offset + size > len(ko) or link >= shnum:
            raise ValueError("a malformed symbol table")
        strings = ko[sections[link][4]:sections[link][4] + sections[link][5]]
        out = []
        for at in range(offset, offset + size - entsize + 1, entsize):
            st_name, _, _, st_shndx, _, _ = ELF64_SYM.unpack_from(ko, at)
            if st_shndx == SHN_UNDEF and st_name:
                end = strings.index(b"\0", st_name)
                out.append((at, strings[st_name:end].decode()))
        return out
    except (struct.error, ValueError, IndexError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadInput(f"{what} is not a valid x86-64 kernel module ({exc})") from None


# What livesplice's core module exports to the new code (livesplice.h).
CORE_EXPORTS = frozenset({"livesplice_shadow_get", "livesplice_shadow_alloc",
                          "livesplice_shadow_get_or_alloc", "livesplice_shadow_free",
                          "livesplice_shadow_free_all"})


def link_unexported(ko: bytes, kallsyms: Kallsyms, names: dict[str, int] | None = None,
                    what: str = "module") -> bytes:
    """The module with undefined symbols made absolute: those in `names` at the address given,
    and every one the kernel does not export at its (unique) vmlinux address in kallsyms. The
    module loader then leaves them as they are, as for any SHN_ABS symbol; exported ones it
    resolves itself, with their version checks."""
    out = bytearray(ko)
    missing = []
    for entry, name in undefined_symbols(ko, what):
        if names is not None and name in names:
            address = names[name]
        elif kallsyms.exported(name) or name in CORE_EXPORTS:
            # (the core's exports: it is loaded before the update, and perhaps after kallsyms
            # was read)
            continue
        else:
            candidates = kallsyms.lookup(name)  # vmlinux's
            found = [c for c in candidates if c.is_global] or candidates
            if len(found) != 1:
                missing.append(name)
                continue
            address = found[0].address
        # st_shndx and st_value, after st_name, st_info and st_other.
        struct.pack_into("<HQ", out, entry + 6, SHN_ABS, address)
    if missing:
        # The package names what this kernel does not have (once) to link its new code against:
        # it was not made for this kernel as it runs. Refused, as a run-pre mismatch is.
        raise Refused(f"the new code of {what} needs symbols the running kernel has not exactly "
                      "once: " + ", ".join(sorted(missing)))
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
