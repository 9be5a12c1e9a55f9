"""The compiled module a module target is (the stock `.ko`): its build id, and where the update's
symbols are in it, as (name, sympos).

A module's static symbols repeat across its objects (two `debug_show` in two files), and the core
finds a symbol in a loaded module by its position among the module's symbols of that name
(`sympos`, 1-based, as livepatch's), counting only symbols the module keeps in memory once
loaded (not init code, not the .modinfo strings) in symbol-table order: the order of the `.ko`'s
table, of the module's kallsyms and of /proc/kallsyms' lines for it.

Which of several same-named functions a pre function is, is decided as run-pre matching decides it
in the running kernel: by comparing code, here against the `.ko`'s bytes, outside the fields the
pre code relocates and the sites the kernel rewrites. The `.ko` was built without
-ffunction-sections, so a call to a static function of the same file may be resolved already
(no relocation, a rel32 in the bytes); both forms are read. The symbols a matched function's
relocated fields lead to give the positions of the statics the new code uses.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from .debian import read_module
from .elfmodel import R
from .errors import BadInput
from .kernel import ELF64_RELA
from .pkgformat import PreFunction

# Sections the loader drops or never allocates (their symbols are not the module's in memory).
_NOT_KEPT_PREFIXES = (".init", ".modinfo", "__versions")
SIGNED = {R["R_X86_64_PC32"], R["R_X86_64_PLT32"], R["R_X86_64_32S"], R["R_X86_64_PC64"]}


@dataclass(frozen=True)
class KoSymbol:
    index: int
    name: str
    type: str  # STT_FUNC, STT_OBJECT, ...
    global_: bool
    section: int  # its section's index; 0 (SHN_UNDEF) for an undefined one
    value: int
    size: int
    sympos: int  # 0: not one the module keeps in memory (undefined, init, ...)


@dataclass
class Located:
    """Where a pre function is in the module, and the positions its relocated fields reveal."""

    sympos: int
    # (name) -> sympos of each module symbol its fields lead to; 0 for one outside the module
    bindings: dict[str, int] = field(default_factory=dict)
    # found by its name alone: its code is not the stock module's (the source already has another
    # update's change: a stacked update), so apply's check of the running code decides
    by_name: bool = False


class ModuleImage:
    """A compiled module (`.ko`), read for its symbols, code and relocations."""

    def __init__(self, path: Path, name: str):
        from elftools.elf.elffile import ELFFile
        from elftools.elf.sections import SymbolTableSection

        from .buildid import elf_build_id

        self.path, self.name = path, name
        try:
            self.raw = read_module(path)  # (.ko.xz: the 6.12 line's modules are compressed)
            elf = ELFFile(io.BytesIO(self.raw))
        except (OSError, Exception) as exc:  # pyelftools raises its own ELFError
            raise BadInput(f"cannot read module {name}'s compiled file {path}: {exc}") from None
        if elf["e_type"] != "ET_REL" or elf["e_machine"] != "EM_X86_64":
            raise BadInput(f"{path}: not an x86-64 kernel module")
        self.build_id = elf_build_id(self.raw)
        self._sections = [(s.name, s["sh_type"], s["sh_flags"], s["sh_offset"], s["sh_size"],
                           s["sh_info"]) for s in elf.iter_sections()]
        self._rela_of: dict[int, int] = {}  # section index -> its SHT_RELA section's index
        for i, (_, stype, _, _, _, info) in enumerate(self._sections):
            if stype == "SHT_RELA":
                self._rela_of[info] = i
        symtab = elf.get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            raise BadInput(f"{path}: no symbol table")
        self.symbols: list[KoSymbol] = []
        counts: dict[str, int] = {}
        for i, sym in enumerate(symtab.iter_symbols()):
            shndx = sym["st_shndx"] if isinstance(sym["st_shndx"], int) else 0
            kept = bool(sym.name) and shndx != 0 and self._kept(shndx)
            pos = 0
            if kept:
                pos = counts[sym.name] = counts.get(sym.name, 0) + 1
            self.symbols.append(KoSymbol(i, sym.name, sym["st_info"]["type"],
                                         sym["st_info"]["bind"] != "STB_LOCAL", shndx,
                                         sym["st_value"], sym["st_size"], pos))
        self._by_name: dict[str, list[KoSymbol]] = {}
        for s in self.symbols:
            if s.sympos:
                self._by_name.setdefault(s.name, []).append(s)
        self._relocs: dict[int, dict[int, tuple[int, KoSymbol, int]]] = {}

    def _kept(self, shndx: int) -> bool:
        if shndx >= len(self._sections):
            return False  # SHN_ABS, SHN_COMMON: not in the module's memory
        name, stype, flags, *_ = self._sections[shndx]
        return bool(flags & 2) and not name.startswith(_NOT_KEPT_PREFIXES)  # SHF_ALLOC

    def named(self, name: str) -> list[KoSymbol]:
        """The module's kept symbols of that name, in table order (sympos 1, 2, ...)."""
        return self._by_name.get(name, [])

    def defines(self, name: str) -> bool:
        return bool(self.named(name))

    def _section_data(self, shndx: int) -> bytes:
        _, stype, _, offset, size, _ = self._sections[shndx]
        return bytes(size) if stype == "SHT_NOBITS" else self.raw[offset:offset + size]

    def _relocations(self, shndx: int) -> dict[int, tuple[int, KoSymbol, int]]:
        """offset -> (type, symbol, addend) of the section's relocations (struct, not pyelftools:
        a large module has hundreds of thousands)."""
        if shndx not in self._relocs:
            out: dict[int, tuple[int, KoSymbol, int]] = {}
            rela = self._rela_of.get(shndx)
            if rela is not None:
                _, _, _, offset, size, _ = self._sections[rela]
                for r_offset, r_info, r_addend in ELF64_RELA.iter_unpack(self.raw[offset:offset + size]):
                    out[r_offset] = (r_info & 0xFFFFFFFF, self.symbols[r_info >> 32], r_addend)
            self._relocs[shndx] = out
        return self._relocs[shndx]

    def _symbol_at(self, shndx: int, value: int, name: str) -> KoSymbol | None:
        return next((s for s in self.named(name) if s.section == shndx and s.value == value), None)

    def compare(self, record: PreFunction, candidate: KoSymbol) -> tuple[str | None, dict[str, int]]:
        """None and the bindings if `candidate` is the pre function's code; else why not."""
        code = record.data()
        data = self._section_data(candidate.section)
        if candidate.size != record.size:
            return f"{candidate.size} bytes, the pre code {record.size}", {}
        mine = data[candidate.value:candidate.value + candidate.size]
        ignore = bytearray(len(code))
        for mask in record.masks:
            ignore[mask.offset:mask.offset + mask.length] = b"\1" * mask.length
        relocs = self._relocations(candidate.section)
        found: dict[str, int] = {}
        for r in record.relocs:
            width = r.width
            ignore[r.offset:r.offset + width] = b"\1" * width
            if r.kind != "sym":
                continue
            at = candidate.value + r.offset
            theirs = relocs.get(at)
            if theirs is not None:
                rtype, sym, addend = theirs
                if sym.section == 0 or not sym.sympos and sym.type != "STT_SECTION":
                    pos = 0  # outside the module: the name must agree
                    if sym.name != r.name:
                        return f"offset {r.offset:#x} refers to {sym.name}, not {r.name}", {}
                    target = None
                else:
                    target = (sym.section, sym.value + addend - r.addend)
            elif r.type in (R["R_X86_64_PC32"], R["R_X86_64_PLT32"]):
                # resolved when the module was assembled: a rel32 within the same section
                value = int.from_bytes(mine[r.offset:r.offset + 4], "little", signed=True)
                target = (candidate.section, at + value - r.addend)
            else:
                return f"offset {r.offset:#x}: no relocation where the pre code has one", {}
            if target is not None:
                led_to = self._symbol_at(target[0], target[1], r.name)
                if led_to is None:
                    return f"offset {r.offset:#x} does not lead to {r.name}", {}
                pos = led_to.sympos
            if found.setdefault(r.name, pos) != pos:
                return f"offset {r.offset:#x}: {r.name} is another one than elsewhere", {}
        for i, (a, b) in enumerate(zip(code, mine)):
            if a != b and not ignore[i]:
                return f"byte at offset {i:#x} differs", {}
        return None, found

    def locate(self, record: PreFunction) -> Located | str:
        """The function of the module the pre code is, with the positions it reveals; or why
        none (or more than one) is."""
        candidates = [s for s in self.named(record.name) if s.type == "STT_FUNC"]
        if not candidates:
            return f"{record.name} is not a function of module {self.name} ({self.path})"
        matched, reasons = [], []
        for c in candidates:
            why, found = self.compare(record, c)
            if why is None:
                matched.append(Located(c.sympos, found))
            else:
                reasons.append(f"#{c.sympos}: {why}")
        if not matched and len(candidates) == 1 and not record.referenced_only:
            return Located(candidates[0].sympos, self._positions_by_name(record), by_name=True)
        if not matched:
            return (f"{record.name} ({record.object}) is not the code of module {self.name}'s "
                    f"{record.name}: " + "; ".join(reasons[:3]))
        if len(matched) > 1 and any(m.bindings != matched[0].bindings for m in matched[1:]):
            return f"{record.name}: {len(matched)} functions of that name in {self.name} match"
        return matched[0]


    def _positions_by_name(self, record: PreFunction) -> dict[str, int]:
        """Positions of the symbols the pre code's fields name, where the name tells: the
        module's only symbol of that name, or 0 (outside the module, or several: the core then
        checks the field against any symbol of the name)."""
        out = {}
        for r in record.relocs:
            if r.kind == "sym":
                named = self.named(r.name)
                out[r.name] = named[0].sympos if len(named) == 1 else 0
        return out

