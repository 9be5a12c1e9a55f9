"""The new code: the changed and new functions of the post objects, as a kernel module.

Each function (with its .cold part) is copied into a section of its own in a fresh relocatable
object, together with the new data and string literals it uses and its entries in the kernel's
tables (alternatives, jump labels, exception fixups, bug table, ORC, __mcount_loc, ...), which the
module loader then processes as for any module. Every reference to something that already exists
in the running kernel becomes an undefined placeholder symbol, `__livesplice_sym_N`, that `apply`
turns into the address run-pre matching found. kbuild links that object with a small stub into a
module against the target kernel's headers.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.constants import SH_FLAGS

from . import debian
from .elfmodel import (
    CODE_TABLES,
    ORC_ENTRY_SIZE,
    ElfWriter,
    Item,
    ObjectFile,
    OutSection,
    OutSymbol,
    R,
    Reloc,
    Section,
    runtime_patched_sites,
    table_entry_size,
)
from .errors import LivespliceError, Refused
from .kbuild import AUTHOR_INCLUDE, run_make
from .kernel import CORE_EXPORTS
from .objdiff import DYNDBG_SECTION, read_only
from .pkgformat import MODULE_PREFIX, PLACEHOLDER_PREFIX, VMLINUX, KernelRef

SECTION_PREFIX = ".text.livesplice."
MODULE_ENTRY_NAMES = ("init_module", "cleanup_module")
# Where the key is, in an entry of the tables whose entries name a key.
KEY_FIELDS = {"__jump_table": 8, ".static_call_sites": 4}
ONCE_SECTION = ".data.once"  # DO_ONCE_LITE's flags
# apply finds each new function through /sys/module/MODULE/sections/SECTION: a sysfs file name,
# at most NAME_MAX (255) bytes.
SECTION_NAME_MAX = 200
TABLES = {k: v for k, v in CODE_TABLES.items() if k not in ("__tracepoints_ptrs", ".ibt_endbr_seal")}


@dataclass
class NewCode:
    writer: ElfWriter = field(default_factory=ElfWriter)
    # (object for a local symbol, else "", name, target of the code that uses it) -> the reference
    refs: dict[tuple[str, str, str], KernelRef] = field(default_factory=dict)
    ref_symbols: dict[tuple[str, str, str], OutSymbol] = field(default_factory=dict)
    functions: dict[tuple[str, str], OutSymbol] = field(default_factory=dict)  # (object, name)
    data: dict[tuple[str, str], OutSymbol] = field(default_factory=dict)
    strings: dict[str, OutSymbol] = field(default_factory=dict)
    core_exports: dict[str, OutSymbol] = field(default_factory=dict)  # livesplice.h's, by name
    copied_sections: dict[tuple[str, str], OutSymbol] = field(default_factory=dict)
    tables: dict[str, OutSection] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the new code does differently, harmlessly
    # global functions the update's own objects define, by (target, name)
    own_globals: dict[tuple[str, str], OutSymbol] = field(default_factory=dict)
    # the target (vmlinux or a module) whose code each section of the new code holds
    section_targets: dict[str, set[str]] = field(default_factory=dict)
    _strsec: OutSection | None = None

    def ref(self, name: str, obj: str, local: bool, kind: str, target: str = VMLINUX) -> OutSymbol:
        """The placeholder for what the kernel has: a local symbol of `obj`, or a global one
        that code of `target` uses (a module's code may use a global of its own module, of a
        module it depends on, or of vmlinux: create's module stage tells which)."""
        key = (obj if local else "", name, target)
        if key not in self.refs:
            placeholder = f"{PLACEHOLDER_PREFIX}{len(self.refs)}"
            where = target if local or target != VMLINUX else ""
            self.refs[key] = KernelRef(placeholder, name, obj if local else "", local, kind,
                                       where, 0, False)
            self.ref_symbols[key] = self.writer.add_symbol(OutSymbol(placeholder, None))
        return self.ref_symbols[key]

    def core_export(self, name: str) -> OutSymbol:
        if name not in self.core_exports:
            self.core_exports[name] = self.writer.add_symbol(OutSymbol(name, None))
        return self.core_exports[name]

    def string(self, text: str) -> OutSymbol:
        if text not in self.strings:
            if self._strsec is None:
                self._strsec = self.writer.add_section(OutSection(
                    ".rodata.livesplice.str", bytearray(), SH_FLAGS.SHF_ALLOC, align=1))
            sec = self._strsec
            sym = OutSymbol(f"__livesplice_str_{len(self.strings)}", sec, len(sec.data),
                            len(text) + 1, "STT_OBJECT", "STB_LOCAL")
            sec.data.extend(text.encode("latin-1") + b"\0")
            self.writer.add_symbol(sym)
            self.strings[text] = sym
        return self.strings[text]


    def bind_own_globals(self) -> None:
        """A global symbol one object of the update uses and another defines (a new function in
        a.c called from b.c) is the update's own, not the kernel's: the placeholder becomes that
        symbol (kallsyms would not have it, or have the old one)."""
        for key in list(self.refs):
            obj, name, target = key
            if obj or (target, name) not in self.own_globals:
                continue
            own = self.own_globals[(target, name)]
            placeholder = self.ref_symbols.pop(key)
            placeholder.section, placeholder.value = own.section, own.value
            placeholder.size, placeholder.type, placeholder.bind = own.size, own.type, "STB_LOCAL"
            del self.refs[key]


def section_name(objname: str, function: str) -> str:
    """The new-code module's section for `function` of object `objname`: one of its own per
    (object, function), since two objects may each have a static function of that name and
    same-named sections are merged when the module is linked. A short hash of both keeps it
    unique and stable (the same update gives the same names); the function's name is there for
    people, cut short if it has to be. Stored in the manifest: apply reads it from there."""
    tag = hashlib.sha256(f"{objname}\0{function}".encode()).hexdigest()[:10]
    return (SECTION_PREFIX + tag + "." + re.sub(r"[^A-Za-z0-9_.]", "_", function))[:SECTION_NAME_MAX]


REWRITE_PREFIX = ".rodata.livesplice.rewrite."


def rewrite_section(objname: str, name: str) -> str:
    """The new-code module's section holding object `name`'s new contents, for a rewrite in
    place (objdiff.DataRewrite); named as section_name() names functions'."""
    tag = hashlib.sha256(f"{objname}\0{name}".encode()).hexdigest()[:10]
    return (REWRITE_PREFIX + tag + "." + re.sub(r"[^A-Za-z0-9_.]", "_", name))[:SECTION_NAME_MAX]


def _plain_constant(item: Item) -> bool:
    """A local read-only object without pointers (a __func__, a table of numbers): a copy is as
    good as the kernel's, which kallsyms often cannot tell apart from others of its name. Objects
    with pointers (ops tables) are not copied: code compares their addresses (nor are those the
    object's data points to: Extractor.published)."""
    return (item.symbol.bind == "STB_LOCAL" and read_only(item) and not item.relocs
            and item.section.type != "SHT_NOBITS")


def is_compiler_clone(name: str) -> bool:
    return any(f".{kind}." in name for kind in ("constprop", "isra", "part"))


class Extractor:
    """Copies what the update needs out of one post object into a NewCode."""

    def __init__(self, code: NewCode, objname: str, post: ObjectFile, names: dict[str, str],
                 included: set[str], target: str = VMLINUX,
                 module_defines: Callable[[str], bool] | None = None):
        self.code, self.objname, self.post, self.names = code, objname, post, names
        self.included = included  # post function names that become new code
        self.target = target  # vmlinux or the module the object is linked into
        # for a module's object: whether that module defines a symbol (stockmodule)
        self.module_defines = module_defines
        self._published: set[tuple[str, int]] | None = None  # see published

    def published(self, item: Item) -> bool:
        """Whether the object's data holds the address of `item` (a driver's id table): the
        running kernel's data points to the kernel's copy, so code may compare with it or store
        it, and the new code must use that copy, not one of its own."""
        if self._published is None:
            held = (self.post.item_at(r.symbol.section, r.symbol.value + r.addend)
                    for holder in self.post.data_objects.values()
                    if holder.section.name != DYNDBG_SECTION  # the new code's are copies
                    for r in holder.relocs if r.symbol.section is not None)
            self._published = {(h.section.name, h.start) for h in held if h is not None}
        return (item.section.name, item.start) in self._published

    def _section(self, section: OutSection) -> OutSection:
        self.code.section_targets.setdefault(section.name, set()).add(self.target)
        return self.code.writer.add_section(section)

    def add_function(self, item: Item) -> OutSymbol:
        key = (self.objname, item.name)
        if key in self.code.functions:
            return self.code.functions[key]
        sec = self._section(OutSection(
            section_name(self.objname, item.name), bytearray(item.data),
            SH_FLAGS.SHF_ALLOC | SH_FLAGS.SHF_EXECINSTR, align=max(item.section.addralign, 16)))
        # modpost gives a module whose object defines init_module or cleanup_module (any
        # binding) an init or exit: the update module must not call a copy at its load.
        name = f"{item.name}.livesplice" if item.name in MODULE_ENTRY_NAMES else item.name
        sym = self.code.writer.add_symbol(OutSymbol(name, sec, 0, item.size, "STT_FUNC",
                                                    "STB_LOCAL"))
        self.code.functions[key] = sym
        for site in runtime_patched_sites(self.post, item):
            if site.kind == "runtime constant":
                self.code.problems.append(
                    f"{self.objname}: {item.name} holds the runtime constant {site.what} (at "
                    f"offset {site.offset:#x}), which the kernel writes into its own code at boot "
                    "and the module loader does not write into a module's")
        if item.symbol.bind != "STB_LOCAL":
            self.code.own_globals.setdefault((self.target, item.name), sym)
        for r in item.relocs:
            self._relocate(sec, r.offset - item.start, r)
        self._tables(item, sym)
        return sym

    def add_rewrite(self, item: Item, ranges: list[tuple[int, int]]) -> OutSection:
        """The new contents of a read-only object rewritten in place: a section of the module
        whose fields in `ranges` the module loader relocates (the core copies only those). A
        function the kernel has is pointed to at its own address, which a replaced function's
        jump leads on from, so that a later update of it is reached too; new functions and data
        are the update's."""
        sec = self._section(OutSection(rewrite_section(self.objname, item.name),
                                       bytearray(item.data), SH_FLAGS.SHF_ALLOC,
                                       align=max(item.section.addralign, 8)))
        for r in item.relocs:
            off = r.offset - item.start
            if not any(start < off + r.width and off < start + length for start, length in ranges):
                continue  # never copied: left unrelocated
            target = self.post.target(r)
            fn = self.post.functions.get(target.name) if target.kind == "sym" else None
            if fn is not None and target.name in self.names:
                sym = self.code.ref(self.names[target.name], self.objname,
                                    fn.symbol.bind == "STB_LOCAL", "func", self.target)
                sec.relocs.append((off, r.type, sym, target.offset))
            else:
                self._relocate(sec, off, r)
        return sec

    def _relocate(self, out: OutSection, offset: int, r: Reloc) -> None:
        sym, addend = self._resolve(r)
        out.relocs.append((offset, r.type, sym, addend))

    def _resolve(self, r: Reloc) -> tuple[OutSymbol, int]:
        """The output symbol and addend for a relocation of the post object."""
        target = self.post.target(r)
        s = r.symbol
        if target.kind == "str":
            return self.code.string(target.name), target.offset
        if target.kind == "sec":
            return self._copy_section(s.section), s.value + r.addend
        # A named item: new code of ours, new data of ours, or something the kernel has.
        name, offset = target.name, target.offset
        functions = self.post.functions
        if name in functions and name in self.included:
            return self.add_function(functions[name]), offset
        data = self.post.data_objects.get(name)
        if data is not None and (name not in self.names or
                                 (_plain_constant(data) and not self.published(data))):
            return self._add_data(data), offset
        if data is not None and data.section.name == DYNDBG_SECTION and self.module_defines:
            # A module's dynamic debug descriptor holds a static key its jump label names, which
            # cannot wait for the module: the new code gets its own, registered with the
            # update's module (`module livesplice_ID +p` switches those pr_debug()s on).
            note = (f"{self.objname}: the new code's pr_debug()s are switched with module "
                    f"{MODULE_PREFIX}ID, not {self.target}")
            if note not in self.code.notes:
                self.code.notes.append(note)
            return self._add_data(data), offset
        if data is not None and data.section.name == ONCE_SECTION:
            # A once-flag (printk_once, WARN_ONCE...: DO_ONCE_LITE's __already_done.N): objects
            # have many, often not told apart by kallsyms. A copy of its own costs at most one
            # more message.
            if (self.objname, data.name) not in self.code.data:  # one note per flag
                self.code.notes.append(f"{self.objname}: the new code has its own {name} (a "
                                       "once-only flag: its message may show once more)")
            return self._add_data(data), offset
        if name in functions and (name not in self.names or is_compiler_clone(name)):
            # A post-only function that is not part of the update: carry it along too. So also a
            # compiler clone: only ever called directly, so a copy is as good as the kernel's,
            # and the kernel often has several of that name (NF_HOOK.constprop.0).
            self.included.add(name)
            return self.add_function(functions[name]), offset
        if s.section is None and name in CORE_EXPORTS:
            # livesplice.h's shadow data: the core's exports, left to the module loader, which
            # checks their versions and makes the update depend on the core.
            return self.code.core_export(name), offset
        kernel_name = self.names.get(name, name)
        item = functions.get(name) or self.post.data_objects.get(name)
        sym = item.symbol if item is not None else s
        kind = {"STT_FUNC": "func", "STT_OBJECT": "object"}.get(sym.type, "notype")
        local = sym.bind == "STB_LOCAL"
        return self.code.ref(kernel_name, self.objname, local, kind, self.target), offset

    def _add_data(self, item: Item) -> OutSymbol:
        key = (self.objname, item.name)
        if key in self.code.data:
            return self.code.data[key]
        flags = item.section.flags & (SH_FLAGS.SHF_ALLOC | SH_FLAGS.SHF_WRITE)
        if item.section.name == DYNDBG_SECTION:
            # The module loader registers the module's descriptors with dynamic debug, so the
            # new code's pr_debug()s can be switched on like any module's.
            sec = self._table(DYNDBG_SECTION, item.section)
            at = len(sec.data)
            sec.data.extend(item.data)
        else:
            nobits = item.section.type == "SHT_NOBITS"
            prefix = ".bss" if nobits else ".data" if flags & SH_FLAGS.SHF_WRITE else ".rodata"
            sec = self._section(OutSection(
                f"{prefix}.livesplice.{item.name}", bytearray(item.data), flags,
                align=max(item.section.addralign, 1),
                type="SHT_NOBITS" if nobits else "SHT_PROGBITS"))
            at = 0
        sym = self.code.writer.add_symbol(OutSymbol(item.name, sec, at, item.size, "STT_OBJECT",
                                                    "STB_LOCAL"))
        self.code.data[key] = sym
        for r in item.relocs:
            self._relocate(sec, at + r.offset - item.start, r)
        return sym

    def _copy_section(self, section: Section | None) -> OutSymbol:
        """A section without named items (e.g. .altinstr_replacement, an unsplit .rodata)."""
        assert section is not None
        key = (self.objname, section.name)
        if key in self.code.copied_sections:
            return self.code.copied_sections[key]
        if section.flags & SH_FLAGS.SHF_WRITE:
            self.code.problems.append(
                f"{self.objname}: new code refers to anonymous writable data in {section.name}")
        sec = self._section(OutSection(
            f"{section.name}.livesplice.{len(self.code.copied_sections)}", bytearray(section.data),
            section.flags & (SH_FLAGS.SHF_ALLOC | SH_FLAGS.SHF_EXECINSTR | SH_FLAGS.SHF_WRITE),
            align=max(section.addralign, 1)))
        sym = self.code.writer.add_symbol(OutSymbol(f"__livesplice_sec_{len(self.code.copied_sections)}",
                                                    sec, 0, 0, "STT_NOTYPE", "STB_LOCAL"))
        self.code.copied_sections[key] = sym
        for r in section.relocs:
            self._relocate(sec, r.offset, r)
        return sym

    def _tables(self, item: Item, sym: OutSymbol) -> None:
        """Copy the table entries that describe this function's code into the module's tables."""
        post = self.post
        for table, (_, site_field) in TABLES.items():
            sec = post.section(table)
            if sec is None:
                continue
            # (the module's table in the object's layout: the target kernel's, whose headers
            # build it)
            entry = table_entry_size(post, table)
            for site_sec, site_off, idx in post.sites(table, entry, site_field):
                if site_sec is not item.section or not item.start <= site_off < item.start + item.size:
                    continue
                if self._module_key(table, sec, idx * entry, item):
                    continue
                out = self._table(table, sec)
                base = len(out.data)
                out.data.extend(sec.data[idx * entry:(idx + 1) * entry])
                for r in sec.relocs_in(idx * entry, (idx + 1) * entry):
                    field_off = base + r.offset - idx * entry
                    pos = r.symbol.value + r.addend
                    if r.symbol.section is item.section and \
                            item.start <= pos <= item.start + item.size:
                        out.relocs.append((field_off, r.type, sym, pos - item.start))
                    else:
                        self._relocate(out, field_off, r)
                if table == ".orc_unwind_ip":
                    orc = post.section(".orc_unwind")
                    if orc is not None:
                        self._table(".orc_unwind", orc).data.extend(
                            orc.data[idx * ORC_ENTRY_SIZE:(idx + 1) * ORC_ENTRY_SIZE])

    def _module_key(self, table: str, sec: Section, entry: int, item: Item) -> bool:
        """Whether to leave out a jump label or static call entry whose key the module target
        itself defines: the module loader reads such entries when it loads the update, before
        the target may even be loaded. A static call still goes through the module's trampoline
        (a field the core links); a tracepoint's jump label stays as compiled, off, in the new
        code. Any other key of the module's own cannot be linked."""
        field = KEY_FIELDS.get(table)
        if field is None or self.module_defines is None:
            return False
        key = next(iter(sec.relocs_in(entry + field, entry + field + 1)), None)
        if key is None:
            return False
        name = self.post.target(key).name
        descriptor = self.post.data_objects.get(name)
        if not self.module_defines(name) or (descriptor is not None
                                              and descriptor.section.name == DYNDBG_SECTION):
            return False  # (a dynamic debug descriptor: the new code has its own, _resolve)
        if table == "__jump_table":
            if name.startswith("__tracepoint_"):
                note = (f"{self.objname}: tracepoint {name[len('__tracepoint_'):]} does not fire "
                        f"in the new code of {item.name} (its key is module {self.target}'s)")
                if note not in self.code.notes:
                    self.code.notes.append(note)
            else:
                self.code.problems.append(
                    f"{self.objname}: {item.name} uses static key {name} of module {self.target}, "
                    "which the new code cannot be linked to before the module loads")
        return True

    def _table(self, name: str, like: Section) -> OutSection:
        if name not in self.code.tables:
            self.code.tables[name] = self.code.writer.add_section(OutSection(
                name, bytearray(), like.flags & (SH_FLAGS.SHF_ALLOC | SH_FLAGS.SHF_WRITE),
                align=max(like.addralign, 1)))
        return self.code.tables[name]


STUB_C = """// livesplice update {id}: the new code. Generated; the code itself is in livesplice_new.o.
#include <linux/module.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("livesplice update {id}: replacement kernel functions");
MODULE_INFO(livesplice_update, "{id}");
"""


def build_module(code: NewCode, module_name: str, update_id: str, headers: Path, workdir: Path,
                 jobs: int = 2, core_symvers: Path | None = None) -> Path:
    """Link the new code into MODULE_NAME.ko with kbuild, against the kernel headers and the
    core's exports (`core_symvers`: its Module.symvers, so that modpost records their versions
    and the dependency on the core)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    code.writer.write(workdir / "livesplice_new.o_shipped")
    # modpost reads each object's .cmd file (for srcversion); a generated object has no sources.
    (workdir / ".livesplice_new.o.cmd").write_text("cmd_livesplice_new.o := livesplice\n")
    (workdir / "livesplice_stub.c").write_text(STUB_C.format(id=update_id))
    (workdir / "Makefile").write_text(
        f"obj-m := {module_name}.o\n{module_name}-y := livesplice_stub.o livesplice_new.o\n")
    extra = [f"KBUILD_EXTRA_SYMBOLS={core_symvers}"] if core_symvers is not None else []
    return _make_module(headers, workdir, jobs, f"{module_name}.ko", "building the update module",
                        f"create-{update_id}-module", extra)


CORE_SOURCE = Path(__file__).with_name("kmod")


def core_module(headers: Path, release: str, build_id: str | None, workdir: Path,
                jobs: int = 2) -> tuple[bytes, Path]:
    """The core module (kmod/livesplice_core.c) built for the target kernel, and its
    Module.symvers (what it exports, with versions): built once per (kernel, its headers'
    config, core source), then taken from the cache."""
    key = hashlib.sha256()
    for part in (release, build_id or "", (headers / ".config").read_bytes()):
        key.update(part.encode() if isinstance(part, str) else part)
        key.update(b"\0")
    for f in sorted(p for d in (CORE_SOURCE, AUTHOR_INCLUDE) for p in d.iterdir() if p.is_file()):
        key.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    cached = debian.cache_root() / "core" / f"{release}-{key.hexdigest()[:16]}" / "livesplice_core.ko"
    symvers = cached.with_name("Module.symvers")
    if cached.is_file() and symvers.is_file():
        return cached.read_bytes(), symvers
    built = build_core(headers, workdir, jobs)
    ko = built.read_bytes()
    cached.parent.mkdir(parents=True, exist_ok=True)
    for data, dest in ((built.with_name("Module.symvers").read_bytes(), symvers), (ko, cached)):
        partial = dest.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, dest)  # whole or absent, even with two creates at once
    return ko, symvers


def build_core(headers: Path, workdir: Path, jobs: int = 2) -> Path:
    """The core module (kmod/livesplice_core.c), built for the target kernel."""
    if workdir.exists():
        shutil.rmtree(workdir)
    shutil.copytree(CORE_SOURCE, workdir)
    for header in AUTHOR_INCLUDE.iterdir():  # the core implements livesplice.h
        shutil.copyfile(header, workdir / header.name)
    # The core calls unexported kernel functions directly; apply links them (kernel.link_unexported).
    return _make_module(headers, workdir, jobs, "livesplice_core.ko", "building the core module",
                        "core-module")


def _make_module(headers: Path, workdir: Path, jobs: int, ko_name: str, what: str,
                 log_name: str, extra: list[str] | None = None) -> Path:
    run_make(["make", "-C", str(headers), f"M={workdir}", f"-j{jobs}", "KBUILD_MODPOST_WARN=1",
              *(extra or []), "modules"], what, log_name)
    ko = workdir / ko_name
    if not ko.exists():
        raise LivespliceError(f"{what} failed: make made no {ko_name}")
    return ko


def _branch(data: bytearray, offset: int) -> bool:
    """Is the rel32 field at `offset` that of a call, jmp or jcc? (Only for a PC-relative field:
    before an absolute one, 0xe8 may be a displacement, as in `movq $fn, -0x18(%rbx)`.)"""
    return (offset >= 1 and data[offset - 1] in (0xE8, 0xE9)) or \
        (offset >= 2 and data[offset - 2] == 0x0F and 0x80 <= data[offset - 1] <= 0x8F)


def _references_not_calls(code: NewCode) -> Iterator[tuple[OutSection, int, OutSymbol, int]]:
    """(section, type, symbol, addend) of each relocation of the new code that is not a call or
    a jump (an address taken: stored, passed, compared, or written into a rewritten table),
    outside the module loader's own tables (jump label keys, exception entries...). A call or
    tail call is a PLT32 relocation, or a PC32 one whose opcode before the field says so."""
    tables = {id(t) for t in code.tables.values()}
    for sec in code.writer.sections:
        if id(sec) in tables:
            continue
        for offset, rtype, sym, addend in sec.relocs:
            if rtype == R["R_X86_64_PLT32"] or (
                    rtype == R["R_X86_64_PC32"] and sec.flags & SH_FLAGS.SHF_EXECINSTR
                    and _branch(sec.data, offset)):
                continue
            yield sec, rtype, sym, addend


def callbacks(code: NewCode) -> list[str]:
    """The new code's functions whose address the new code takes (not only calls): they may be
    left behind as timer, work or other callbacks, which sit on no stack, so undo cannot see
    them: an absolute or RIP-relative reference to the function's start. And what a rewritten
    table points to in the update (a new function, data, a string): the kernel may have copied
    the pointer (a BPF program's JIT, a registered hook, a netlink dump in progress)."""
    by_symbol = {id(sym): name for (_, name), sym in code.functions.items()}
    kernel = {id(sym) for sym in code.ref_symbols.values()}
    found = set()
    for sec, rtype, sym, addend in _references_not_calls(code):
        if sec.name.startswith(REWRITE_PREFIX):
            if id(sym) not in kernel:
                found.add(by_symbol.get(id(sym)) or
                          f"{sec.name[len(REWRITE_PREFIX) + 11:]}->{sym.name}")
        elif id(sym) in by_symbol and addend + (4 if rtype == R["R_X86_64_PC32"] else 0) == 0:
            found.add(by_symbol[id(sym)])
    return sorted(found)


def mark_address_taken(code: NewCode) -> None:
    """Mark the kernel references whose address the new code takes rather than only calls:
    with IBT, such a function is called indirectly and must start with ENDBR, which the kernel
    seals at boot in functions whose address vmlinux never takes (apply checks the live bytes)."""
    by_symbol = {id(sym): key for key, sym in code.ref_symbols.items()}
    for _, _, sym, _ in _references_not_calls(code):
        if id(sym) in by_symbol:
            code.refs[by_symbol[id(sym)]].address_taken = True


def check_problems(code: NewCode) -> None:
    if code.problems:
        raise Refused("the new code cannot be packaged safely", code.problems)
