"""The ELF model: relocatable x86-64 objects as sections, symbols and relocations.

pyelftools reads; this module adds what livesplice needs on top: every relocation's target named by a
symbol rather than a section offset (objects are built with -ffunction-sections -fdata-sections, so a
section symbol plus an addend almost always lands on a named function or object), the code and data
items of an object with their extents, and the kernel's special sections parsed into the sites they
describe. `ElfWriter` writes a new relocatable object, for the update module's new code.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from elftools.elf.constants import SH_FLAGS
from elftools.elf.enums import ENUM_RELOC_TYPE_x64

from .errors import BadInput

R = ENUM_RELOC_TYPE_x64
# Bytes a relocation of each type writes, at its offset.
RELOC_WIDTH = {R["R_X86_64_64"]: 8, R["R_X86_64_PC64"]: 8, R["R_X86_64_PC32"]: 4,
               R["R_X86_64_PLT32"]: 4, R["R_X86_64_32"]: 4, R["R_X86_64_32S"]: 4}
PC_RELATIVE = {R["R_X86_64_PC32"], R["R_X86_64_PLT32"], R["R_X86_64_PC64"]}


def reloc_width(rtype: int) -> int:
    """Bytes a relocation of type `rtype` writes (RELOC_WIDTH; any other type is taken as 4)."""
    return RELOC_WIDTH.get(rtype, 4)

# Compiler-made names: "foo.isra.0", "foo.constprop.3", "foo.part.1", "foo.cold", "rs.12".
_NUMBERED = re.compile(r"\.(\d+)(?=\.|$)")
# __UNIQUE_ID_<prefix><__COUNTER__>: the counter moves when a patch adds an earlier one.
_UNIQUE_ID = re.compile(r"^(__UNIQUE_ID_.*?)\d+(?=\.|$)")
# BTF_ID()'s 4-byte slots, __BTF_ID__<kind>__<name>__<__COUNTER__><__LINE__>: renamed whenever a
# patch moves lines (which made every ops table pointing to one look changed).
_BTF_ID = re.compile(r"^(__BTF_ID__\w+__)\d+$")


def base_name(name: str) -> str:
    """A symbol name without the numbers the compiler gives clones and static locals."""
    if _BTF_ID.match(name):
        return _BTF_ID.sub(r"\1N", name)
    return _NUMBERED.sub(".N", _UNIQUE_ID.sub(r"\1N", name))


@dataclass(eq=False)
class Section:
    index: int
    name: str
    type: str
    flags: int
    addralign: int
    entsize: int
    data: bytes
    relocs: list[Reloc] = field(default_factory=list)

    @property
    def is_alloc(self) -> bool:
        return bool(self.flags & SH_FLAGS.SHF_ALLOC)

    @property
    def is_strings(self) -> bool:
        return bool(self.flags & SH_FLAGS.SHF_MERGE) and bool(self.flags & SH_FLAGS.SHF_STRINGS)

    @property
    def size(self) -> int:
        return len(self.data)

    def relocs_in(self, start: int, end: int) -> list[Reloc]:
        return [r for r in self.relocs if start <= r.offset < end]


@dataclass(eq=False)
class Symbol:
    index: int
    name: str
    type: str  # STT_FUNC, STT_OBJECT, STT_SECTION, STT_NOTYPE, STT_FILE
    bind: str  # STB_LOCAL, STB_GLOBAL, STB_WEAK
    section: Section | None  # None: undefined or absolute
    value: int
    size: int

    def __repr__(self) -> str:
        where = self.section.name if self.section else "UND"
        return f"<Symbol {self.name} {self.type} {self.bind} {where}+{self.value:#x}/{self.size}>"


@dataclass(eq=False)
class Reloc:
    offset: int
    type: int
    symbol: Symbol
    addend: int

    @property
    def width(self) -> int:
        return reloc_width(self.type)


@dataclass(frozen=True)
class RelocTarget:
    """Where a relocation points, independent of section layout.

    kind "sym": symbol `name` at `offset` from its start (offset is the raw addend less the symbol's
    position); kind "str": a string literal `name` (its text), `offset` from the string's start
    after undoing the usual -4 of PC-relative fields; kind "sec": a section without a suitable
    symbol, `name` the section's name and `offset` the addend.
    """

    kind: str
    name: str
    offset: int


@dataclass(eq=False)
class Item:
    """A function or data object: a named extent of a section."""

    symbol: Symbol
    section: Section
    start: int
    size: int

    @property
    def name(self) -> str:
        return self.symbol.name

    @property
    def data(self) -> bytes:
        return self.section.data[self.start:self.start + self.size]

    @property
    def relocs(self) -> list[Reloc]:
        return self.section.relocs_in(self.start, self.start + self.size)


def _alias_rank(sym: Symbol) -> tuple:
    """Which of the names of one place an object's items use: the one its own section is named
    after (-ffunction-sections: `.text.uvesafb_init`), then a local name, then the first."""
    own = sym.section is not None and sym.section.name.endswith("." + sym.name)
    return (not own, sym.bind != "STB_LOCAL", sym.index)


class ObjectFile:
    """A relocatable ELF object (a kernel .o built with -ffunction-sections -fdata-sections)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.raw = f.read()
        except OSError as exc:
            raise BadInput(f"cannot read object {self.path}: {exc.strerror}") from None
        # Here, not at the top: apply imports this module for its constants and reads no object.
        from elftools.elf.elffile import ELFFile
        from elftools.elf.relocation import RelocationSection
        from elftools.elf.sections import SymbolTableSection

        # Parsed once: the sections, symbols and relocations below, and the DWARF that
        # structlayout reads, all come from this one ELFFile.
        self.elf = ELFFile(io.BytesIO(self.raw))
        if self.elf["e_type"] != "ET_REL" or self.elf["e_machine"] != "EM_X86_64":
            raise BadInput(f"{self.path}: not an x86-64 relocatable object")
        self.sections: list[Section | None] = []
        for i, s in enumerate(self.elf.iter_sections()):
            data = bytes(s["sh_size"]) if s["sh_type"] == "SHT_NOBITS" else s.data()
            self.sections.append(Section(i, s.name, s["sh_type"], s["sh_flags"], s["sh_addralign"],
                                         s["sh_entsize"], data))
        symtab = self.elf.get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            raise BadInput(f"{self.path}: no symbol table")
        self.symbols: list[Symbol] = []
        for i, sym in enumerate(symtab.iter_symbols()):
            shndx = sym["st_shndx"]
            section = self.sections[shndx] if isinstance(shndx, int) else None
            name = sym.name
            if sym["st_info"]["type"] == "STT_SECTION" and section is not None:
                name = section.name
            self.symbols.append(Symbol(i, name, sym["st_info"]["type"], sym["st_info"]["bind"],
                                       section, sym["st_value"], sym["st_size"]))
        for s in self.elf.iter_sections():
            if isinstance(s, RelocationSection) and s["sh_type"] == "SHT_RELA":
                target = self.sections[s["sh_info"]]
                target.relocs = sorted(
                    (Reloc(r["r_offset"], r["r_info_type"], self.symbols[r["r_info_sym"]], r["r_addend"])
                     for r in s.iter_relocations()), key=lambda r: r.offset)
            elif s["sh_type"] == "SHT_REL":
                raise BadInput(f"{self.path}: REL relocations are not expected on x86-64")

    def section(self, name: str) -> Section | None:
        for s in self.sections:
            if s is not None and s.name == name:
                return s
        return None

    @cached_property
    def items(self) -> list[Item]:
        """Every function and data object defined in an allocated section, an alias counted
        once (see `aliases`)."""
        at: dict[tuple, list[Symbol]] = {}
        for sym in self.symbols:
            if sym.type in ("STT_FUNC", "STT_OBJECT") and sym.section is not None \
                    and sym.section.is_alloc:
                at.setdefault((sym.section.index, sym.value, sym.type), []).append(sym)
        out = []
        self._aliases: dict[str, str] = {}
        for syms in at.values():
            sym = min(syms, key=_alias_rank)
            section = sym.section
            assert section is not None
            size = sym.size
            if size == 0 and sym.type == "STT_FUNC":
                size = section.size - sym.value
            out.append(Item(sym, section, sym.value, size))
            for other in syms:
                if other is not sym:
                    self._aliases[other.name] = sym.name
        out.sort(key=lambda i: i.symbol.index)
        return out

    @cached_property
    def aliases(self) -> dict[str, str]:
        """Other names of a function or object: the alias a macro gives it (module_init's
        `init_module`, `__alias`) to the name it has in `items`. One place, one code: it is
        diffed, replaced and jumped to once, under the name its section carries."""
        _ = self.items  # fills them
        return self._aliases

    @cached_property
    def functions(self) -> dict[str, Item]:
        return {i.name: i for i in self.items if i.symbol.type == "STT_FUNC"}

    @cached_property
    def data_objects(self) -> dict[str, Item]:
        return {i.name: i for i in self.items if i.symbol.type == "STT_OBJECT"}

    @cached_property
    def _items_by_section(self) -> dict[int, list[Item]]:
        by: dict[int, list[Item]] = {}
        for item in self.items:
            by.setdefault(item.section.index, []).append(item)
        for lst in by.values():
            lst.sort(key=lambda i: i.start)
        return by

    def item_at(self, section: Section, offset: int) -> Item | None:
        for item in self._items_by_section.get(section.index, []):
            if item.start <= offset < item.start + max(item.size, 1):
                return item
        return None

    def string_at(self, section: Section, offset: int) -> tuple[str, int]:
        """The NUL-terminated string of a string section that holds byte `offset`."""
        data = section.data
        start = data.rfind(b"\0", 0, offset) + 1 if offset > 0 else 0
        end = data.find(b"\0", offset)
        if end < 0:
            end = len(data)
        return data[start:end].decode("latin-1"), offset - start

    def target(self, reloc: Reloc) -> RelocTarget:
        sym = reloc.symbol
        section = sym.section
        # Assembler labels the object keeps (.LC0 in a mergeable section) are anonymous places in
        # their section, like section symbols: a string literal, a constant, part of an object.
        anonymous = sym.type == "STT_SECTION" or (
            sym.type == "STT_NOTYPE" and sym.bind == "STB_LOCAL" and section is not None
            and sym.name.startswith(".L"))
        if not anonymous:
            return RelocTarget("sym", sym.name, reloc.addend)
        assert section is not None
        # A PC-relative field sits at the end of its instruction: the byte it means is 4 further.
        adjust = 4 if reloc.type in (R["R_X86_64_PC32"], R["R_X86_64_PLT32"]) else 0
        where = sym.value + reloc.addend + adjust
        if section.is_strings:
            text, inside = self.string_at(section, where)
            return RelocTarget("str", text, inside - adjust)
        item = self.item_at(section, where)
        for extra in (1, 2, 4) if adjust and item is None else ():
            # An immediate after the displacement (cmpb $0, x(%rip)) moves the field further
            # from the instruction's end.
            item = self.item_at(section, where + extra)
            if item is not None:
                break
        if item is not None:
            return RelocTarget("sym", item.name, sym.value + reloc.addend - item.start)
        return RelocTarget("sec", section.name, sym.value + reloc.addend)

    # --- the kernel's special sections -----------------------------------------------------------

    def sites(self, section_name: str, entry_size: int,
              field_offset: int = 0) -> list[tuple[Section, int, int]]:
        """For a table section, (target section, offset, entry index) of each entry's field at
        `field_offset`: the code location that entry describes."""
        sec = self.section(section_name)
        if sec is None:
            return []
        out = []
        for r in sec.relocs:
            if r.offset % entry_size == field_offset and r.symbol.section is not None:
                out.append((r.symbol.section, r.symbol.value + r.addend, r.offset // entry_size))
        return out


# Table sections whose entries point at code, as laid out in Linux 6.1 on x86-64:
# name -> (entry size, offset of the field that points at the code site).
CODE_TABLES: dict[str, tuple[int, int]] = {
    "__mcount_loc": (8, 0),
    ".altinstructions": (12, 0),
    ".parainstructions": (16, 0),
    "__jump_table": (16, 0),
    ".static_call_sites": (8, 0),
    ".retpoline_sites": (4, 0),
    ".return_sites": (4, 0),
    ".call_sites": (4, 0),
    ".ibt_endbr_seal": (4, 0),
    ".smp_locks": (4, 0),
    "__ex_table": (12, 0),
    "__bug_table": (12, 0),
    ".orc_unwind_ip": (4, 0),
    "__tracepoints_ptrs": (4, 0),
}
# Parallel to .orc_unwind_ip, without relocations of its own.
ORC_ENTRY_SIZE = 6
# struct alt_instr: 12 bytes up to Linux 6.2 (u16 cpuid, then instrlen at 10); 14 since 6.3
# (u32 ft_flags, then instrlen at 12, replacementlen at 13), as in the 6.12 line.
ALT_INSTR_SIZES = (12, 14)


def table_entry_size(obj: ObjectFile, table: str) -> int:
    """The size of an entry of CODE_TABLES' `table` in this object (struct alt_instr's depends
    on the kernel's version)."""
    return alt_instr_size(obj) if table == ".altinstructions" else CODE_TABLES[table][0]


def alt_instr_size(obj: ObjectFile) -> int:
    """The size of an .altinstructions entry in this object (ALT_INSTR_SIZES): each entry has
    two relocated fields (instr_offset at 0, repl_offset at 4), so the section holds half as
    many entries as it has relocations. 12 for an object without any."""
    sec = obj.section(".altinstructions")
    if sec is None or not sec.relocs:
        return ALT_INSTR_SIZES[0]
    fields = sorted({r.offset for r in sec.relocs})
    entries = len(fields) // 2
    for size in ALT_INSTR_SIZES:
        if entries and size * entries == len(sec.data) and \
                all(f % size in (0, 4) for f in fields):
            return size
    raise ValueError(f".altinstructions of {len(sec.data)} bytes with {len(fields)} relocated "
                     f"fields: not a table of struct alt_instr of {' or '.join(map(str, ALT_INSTR_SIZES))} "
                     "bytes")


class RuntimeSite(NamedTuple):
    """A place in a function's code that the kernel rewrites by itself."""

    offset: int  # from the function's start
    length: int
    kind: str  # one of SITE_KINDS
    what: str = ""  # what drives it, where the table says: a static key, a static call's key


# What each kind of site is, and when the running kernel rewrites it (Linux 6.1, x86-64).
#
# Rewritten at any time while the kernel runs, so that no livesplice jump may cover them: the
# kernel would rewrite (part of) the jump, or find it where it expects its own instruction and
# BUG() (jump_label_patch(), __static_call_validate()).
#   fentry call:  ftrace turns it into a call and back when tracing is switched (text_poke_bp).
#   jump label:   static_key_enable/disable() (tracepoints, dynamic debug, sched features, ...).
#   static call:  static_call_update() (preempt=dynamic's might_resched/cond_resched, pv clocks,
#                 tracepoint iterators, ...): __static_call_validate() BUGs on an unknown insn.
#   lock prefix:  .smp_locks: alternatives_smp_unlock/lock() switch `lock` <-> `ds` when a kernel
#                 booted with one CPU present brings up a second (alternatives_enable_smp());
#                 they look at one byte, which under a jump is part of its displacement.
# Applied once, by alternative_instructions() at boot (for vmlinux: before init runs, so before
# any update), and never again for vmlinux's code: a jump written over them overwrites their final
# form, which run-pre matching masks and the core checks byte for byte before writing.
#   alternative:  apply_alternatives() (CPU features; a late microcode load does not re-run it).
#   paravirt call: apply_paravirt().
#   retpoline call, return thunk: apply_retpolines(), apply_returns().
#   call thunk:   .call_sites (6.2+, call depth tracking): patched at boot and module load only.
#   endbr:        X86_KERNEL_IBT: apply_seal_endbr() turns the ENDBR at a function's entry into
#                 `osp nop3` (66 0f 1f 00) where vmlinux never takes its address; run-pre
#                 matching takes either, nothing else.
#   runtime constant: runtime_ptr_SYM / runtime_shift_SYM (6.11+: USER_PTR_MAX, the dentry
#                 hash): an immediate the kernel writes into its own code at boot
#                 (runtime_const_init()); the module loader does not, so new code may not hold one.
SITES_REWRITTEN_AT_RUN_TIME = frozenset({"fentry call", "jump label", "static call",
                                         "lock prefix"})
SITES_PATCHED_AT_BOOT = frozenset({"alternative", "paravirt call", "retpoline call",
                                   "return thunk", "call thunk", "endbr", "runtime constant"})
ENDBR64 = b"\xf3\x0f\x1e\xfa"
ENDBR_POISON = b"\x66\x0f\x1f\x00"  # a sealed ENDBR
RUNTIME_CONST_TABLES = {"runtime_ptr_": 8, "runtime_shift_": 1}  # prefix -> immediate's bytes
SITE_KINDS = SITES_REWRITTEN_AT_RUN_TIME | SITES_PATCHED_AT_BOOT
_THUNK_TABLES = {".static_call_sites": "static call", ".retpoline_sites": "retpoline call",
                 ".return_sites": "return thunk", ".call_sites": "call thunk"}


def runtime_patched_sites(obj: ObjectFile, item: Item) -> list[RuntimeSite]:
    """Every place within `item` the running kernel rewrites by itself: fentry calls,
    alternatives, paravirt calls, jump labels, static calls, retpoline and return thunk sites,
    lock prefixes. Those bytes are not compared with the running kernel."""
    sites: list[RuntimeSite] = []
    end = item.start + item.size
    data = item.section.data

    def inside(sec: Section, off: int) -> bool:
        return sec is item.section and item.start <= off < end

    def key(table: str, idx: int, entry: int, field: int) -> str:
        """The name of what the table entry's field at `field` points at."""
        sec = obj.section(table)
        for r in sec.relocs_in(idx * entry + field, idx * entry + field + 1) if sec else ():
            t = obj.target(r)
            if t.kind == "sym" and t.name in obj.data_objects and \
                    obj.data_objects[t.name].section.name == "__dyndbg":
                return f"the dynamic debug descriptor {t.name}"
            return t.name
        return ""

    for sec, off, _ in obj.sites("__mcount_loc", 8):
        if inside(sec, off):
            sites.append(RuntimeSite(off - item.start, 5, "fentry call"))
    alt = obj.section(".altinstructions")
    alt_size = alt_instr_size(obj)
    for sec, off, idx in obj.sites(".altinstructions", alt_size):
        if inside(sec, off) and alt is not None:
            instrlen = alt.data[idx * alt_size + alt_size - 2]
            sites.append(RuntimeSite(off - item.start, instrlen, "alternative"))
    para = obj.section(".parainstructions")
    for sec, off, idx in obj.sites(".parainstructions", 16):
        if inside(sec, off) and para is not None:
            sites.append(RuntimeSite(off - item.start, para.data[idx * 16 + 9], "paravirt call"))
    for sec, off, idx in obj.sites("__jump_table", 16):
        if inside(sec, off):
            two_byte = data[off] == 0xEB or data[off:off + 2] == b"\x66\x90"
            sites.append(RuntimeSite(off - item.start, 2 if two_byte else 5, "jump label",
                                     key("__jump_table", idx, 16, 8)))
    for name, kind in _THUNK_TABLES.items():
        size = CODE_TABLES[name][0]
        for sec, off, idx in obj.sites(name, size):
            if inside(sec, off):
                length = 6 if data[off] == 0x0F else 5  # jcc rel32 to a thunk, else call/jmp rel32
                what = key(name, idx, size, 4) if kind == "static call" else ""
                sites.append(RuntimeSite(off - item.start, length, kind, what))
    for sec, off, _ in obj.sites(".smp_locks", 4):
        if inside(sec, off):
            sites.append(RuntimeSite(off - item.start, 1, "lock prefix"))
    if item.symbol.type == "STT_FUNC" and data[item.start:item.start + 4] == ENDBR64:
        sites.append(RuntimeSite(0, 4, "endbr"))
    for table in obj.sections:
        prefix = next((p for p in RUNTIME_CONST_TABLES
                       if table is not None and table.name.startswith(p)), None)
        if table is None or prefix is None:
            continue
        for sec, off, _ in obj.sites(table.name, 4):
            if inside(sec, off):
                sites.append(RuntimeSite(off - item.start, RUNTIME_CONST_TABLES[prefix],
                                         "runtime constant", table.name[len(prefix):]))
    return sorted(sites)


def fentry_offset(obj: ObjectFile, item: Item) -> int | None:
    """Offset of the function's `call __fentry__` site, if it has one."""
    for sec, off, _ in obj.sites("__mcount_loc", 8):
        if sec is item.section and item.start <= off < item.start + item.size:
            return off - item.start
    return None


# --- writing -----------------------------------------------------------------------------------

SHT = {"SHT_NULL": 0, "SHT_PROGBITS": 1, "SHT_SYMTAB": 2, "SHT_STRTAB": 3, "SHT_RELA": 4,
       "SHT_NOBITS": 8}
STT = {"STT_NOTYPE": 0, "STT_OBJECT": 1, "STT_FUNC": 2, "STT_SECTION": 3}
STB = {"STB_LOCAL": 0, "STB_GLOBAL": 1, "STB_WEAK": 2}


@dataclass
class OutSection:
    name: str
    data: bytearray
    flags: int
    align: int = 16
    type: str = "SHT_PROGBITS"
    entsize: int = 0
    relocs: list[tuple[int, int, OutSymbol, int]] = field(default_factory=list)


@dataclass(eq=False)
class OutSymbol:
    name: str
    section: OutSection | None  # None: undefined
    value: int = 0
    size: int = 0
    type: str = "STT_NOTYPE"
    bind: str = "STB_GLOBAL"


class ElfWriter:
    """Builds a minimal x86-64 relocatable object: sections with relocations, and a symbol table."""

    def __init__(self) -> None:
        self.sections: list[OutSection] = []
        self.symbols: list[OutSymbol] = []

    def add_section(self, section: OutSection) -> OutSection:
        self.sections.append(section)
        return section

    def add_symbol(self, symbol: OutSymbol) -> OutSymbol:
        self.symbols.append(symbol)
        return symbol

    def write(self, path: Path) -> None:
        shstr = bytearray(b"\0")
        strtab = bytearray(b"\0")

        def add(table: bytearray, s: str) -> int:
            off = len(table)
            table.extend(s.encode() + b"\0")
            return off

        # Section order: NULL, content sections, their .rela, .symtab, .strtab, .shstrtab.
        content = list(self.sections)
        index = {id(s): i + 1 for i, s in enumerate(content)}
        rela_for = [s for s in content if s.relocs]
        n_content = len(content)
        symtab_index = n_content + len(rela_for) + 1
        strtab_index = symtab_index + 1
        shstrtab_index = strtab_index + 1

        # Symbols: null, a section symbol per content section, locals, then globals.
        locals_ = [s for s in self.symbols if s.bind == "STB_LOCAL"]
        globals_ = [s for s in self.symbols if s.bind != "STB_LOCAL"]
        sym_entries = [struct.pack("<IBBHQQ", 0, 0, 0, 0, 0, 0)]
        sym_index: dict[int, int] = {}
        for s in content:
            sym_entries.append(struct.pack("<IBBHQQ", 0, STT["STT_SECTION"], 0, index[id(s)], 0, 0))
        for sym in locals_ + globals_:
            sym_index[id(sym)] = len(sym_entries)
            shndx = index[id(sym.section)] if sym.section is not None else 0
            info = (STB[sym.bind] << 4) | STT[sym.type]
            sym_entries.append(struct.pack("<IBBHQQ", add(strtab, sym.name), info, 0, shndx,
                                           sym.value, sym.size))
        first_global = 1 + len(content) + len(locals_)

        blobs: list[tuple[int, bytes, int, int, int, int, int, int, int]] = []
        # (name_off, data, type, flags, link, info, align, entsize, nobits_size)
        for s in content:
            nobits = s.type == "SHT_NOBITS"
            blobs.append((add(shstr, s.name), b"" if nobits else bytes(s.data), SHT[s.type],
                          s.flags, 0, 0, s.align, s.entsize, len(s.data) if nobits else 0))
        for s in rela_for:
            rel = b"".join(struct.pack("<QQq", off, (sym_index[id(sym)] << 32) | rtype, addend)
                           for off, rtype, sym, addend in sorted(s.relocs, key=lambda r: r[0]))
            blobs.append((add(shstr, ".rela" + s.name), rel, SHT["SHT_RELA"], 0x40, symtab_index,
                          index[id(s)], 8, 24, 0))
        blobs.append((add(shstr, ".symtab"), b"".join(sym_entries), SHT["SHT_SYMTAB"], 0,
                      strtab_index, first_global, 8, 24, 0))
        name_strtab = add(shstr, ".strtab")
        name_shstrtab = add(shstr, ".shstrtab")
        blobs.append((name_strtab, bytes(strtab), SHT["SHT_STRTAB"], 0, 0, 0, 1, 0, 0))
        blobs.append((name_shstrtab, bytes(shstr), SHT["SHT_STRTAB"], 0, 0, 0, 1, 0, 0))

        out = bytearray(64)
        headers = [bytes(64)]
        for name_off, data, typ, flags, link, info, align, entsize, nobits_size in blobs:
            align = max(align, 1)
            while len(out) % align:
                out.append(0)
            offset = len(out)
            out.extend(data)
            size = nobits_size if typ == SHT["SHT_NOBITS"] else len(data)
            headers.append(struct.pack("<IIQQQQIIQQ", name_off, typ, flags, 0, offset, size, link,
                                       info, align, entsize))
        while len(out) % 8:
            out.append(0)
        shoff = len(out)
        for h in headers:
            out.extend(h)
        ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
        out[0:64] = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64,
                                        len(headers), shstrtab_index)
        path.write_bytes(bytes(out))
