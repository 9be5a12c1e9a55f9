"""The object diff: which functions of a pre/post object pair changed, and what cannot change live.

Two functions are the same when their bytes are equal once relocation fields are masked, and their
relocations agree in type, offset, target and addend, with targets named by symbol (see
`elfmodel.RelocTarget`) and compiler-numbered names (`.isra.N`, `.constprop.N`, `.part.N`, `.cold`,
`name.N` static locals) correlated between the two builds. The entries the kernel's tables hold for a
function (alternatives, jump labels, exception fixups, ...) are part of what is compared.
A difference only in the `__LINE__` immediates passed to might_sleep() and friends, or in the line
number of a dynamic debug descriptor, is not a change.

Changed data is refused, except in two cases. Where the new code can have a copy of its own (a
local read-only object without pointers that only code of this object reaches, or a dynamic debug
descriptor), every function that uses it counts as changed, so that the new code uses the copy.
Where a read-only object of vmlinux keeps its size (an ops table, a protocol descriptor, a netlink
policy: const or __ro_after_init data), it is rewritten in place (`DataRewrite`): only the bytes
that differ, pointers included, whose new values the update's module holds (relocated when it
loads) and the core copies in under stop_machine.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from elftools.elf.constants import SH_FLAGS

from .elfmodel import (
    CODE_TABLES,
    ENDBR64,
    SITES_PATCHED_AT_BOOT,
    Item,
    ObjectFile,
    RelocTarget,
    RuntimeSite,
    base_name,
    fentry_offset,
    runtime_patched_sites,
    table_entry_size,
)
from .errors import BadInput
from .pkgformat import HOOK_KINDS

# Sections whose functions livesplice does not redirect, with why.
UNREDIRECTABLE_SECTIONS = {
    ".noinstr.text": "noinstr code (entry/idle paths where no instrumentation may run)",
    ".entry.text": "entry code",
    ".head.text": "early boot code",
    ".cpuidle.text": "idle code that runs with RCU not watching",
}
INIT_SECTION_PREFIXES = (".init.", ".meminit.", ".cpuinit.", ".head.")
EXIT_SECTION_PREFIXES = (".exit.",)
# Functions that take (file, line, ...) so that a patch shifting lines changes only an immediate.
LINE_TAKING_FUNCTIONS = {"__might_sleep", "__might_resched", "__might_fault", "__cant_sleep",
                         "__cant_migrate", "__might_resched_precision", "lockdep_rcu_suspicious",
                         "__warn_printk", "warn_slowpath_fmt", "__mmiowb_spin_unlock"}
JUMP_SIZE = 5  # jmp rel32
EXPORT_TABLES = ("___ksymtab", "__ksymtab", "__kcrctab")
# Dynamic debug descriptors (struct _ddebug): four pointers, then `lineno:18` in the next word.
DYNDBG_SECTION = "__dyndbg"
DYNDBG_LINENO = (32, 0x3FFFF)


@dataclass
class FunctionChange:
    name: str  # in the post object
    pre_name: str | None  # None for a new function
    section: str
    size: int
    pre_size: int = 0
    parts: list[str] = field(default_factory=list)  # .cold parts that go with it


# __ro_after_init data: written during boot, read-only once mark_rodata_ro() has run (the core
# checks at apply that the address lies in vmlinux's [__start_rodata, __end_rodata)).
RO_AFTER_INIT_SECTION = ".data..ro_after_init"
ABS64 = 1  # R_X86_64_64: the only relocation a rewritten word may hold (a pointer)
MAX_WRITE = 4096  # bytes of one range (the core's MAX_WRITE_SIZE)


@dataclass
class DataRewrite:
    """A read-only object of vmlinux rewritten in place: its `ranges` ([offset, length]) differ."""

    name: str  # in the post object
    pre_name: str
    section: str
    size: int
    ranges: list[tuple[int, int]]
    ro_after_init: bool  # bytes outside `ranges` may differ from the object file (init wrote them)


@dataclass
class ObjectDiff:
    object: str
    changed: list[FunctionChange] = field(default_factory=list)
    new: list[FunctionChange] = field(default_factory=list)
    new_data: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    line_only: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hooks: list[tuple[str, str]] = field(default_factory=list)  # (kind, post function), in order
    names: dict[str, str] = field(default_factory=dict)  # post name -> pre name, correlated
    rewrites: list[DataRewrite] = field(default_factory=list)

    @property
    def has_changes(self) -> bool:
        return bool(self.changed or self.new or self.rewrites)


HOOK_SECTION_PREFIX = ".livesplice.hooks."


def hook_entries(obj: ObjectFile) -> list[tuple[str, str]]:
    """The hooks livesplice.h's macros declared in `obj`: (kind, function), in source order
    (each macro is a pointer in section .livesplice.hooks.KIND, emitted in source order)."""
    out = []
    for sec in obj.sections:
        if sec is None or not sec.name.startswith(HOOK_SECTION_PREFIX):
            continue
        kind = sec.name[len(HOOK_SECTION_PREFIX):]
        for r in sec.relocs:
            target = obj.target(r)
            variable = obj.item_at(sec, r.offset)
            line = re.match(rf"__livesplice_hook_{re.escape(kind)}_(\d+)_",
                            variable.name if variable is not None else "")
            if line is None:
                raise BadInput(f"{obj.path.name}: an entry of {sec.name} at {r.offset:#x} is not "
                               "one livesplice.h's macros make (__livesplice_hook_KIND_LINE_FN): "
                               "declare hooks with LIVESPLICE_PRE_APPLY(fn) and the like")
            out.append((int(line.group(1)), r.offset, kind,
                        target.name if target.kind == "sym" and not target.offset
                        else f"{target.kind}:{target.name}+{target.offset}"))
    return [(kind, function) for *_, kind, function in sorted(out)]


def diff_hooks(pre: ObjectFile, post: ObjectFile, name: str, diff: ObjectDiff) -> None:
    """The object's hooks that are the patch's own: those of the post object that the pre object
    does not declare (a stacked update's pre source has the older update's hooks). Each must be a
    known kind naming a function the new code carries."""
    before = set(hook_entries(pre))
    carried = {c.name for c in diff.changed + diff.new}
    for kind, function in hook_entries(post):
        if (kind, function) in before:
            continue
        if kind not in HOOK_KINDS:
            diff.refusals.append(f"{name}: unknown hook kind {kind!r} (section "
                                 f"{HOOK_SECTION_PREFIX}{kind}): livesplice.h declares "
                                 f"{', '.join(HOOK_KINDS)}")
        elif function not in carried:
            diff.refusals.append(f"{name}: {kind} hook {function} is not a function the patch "
                                 "adds or changes: a hook must be the patch's own code")
        else:
            diff.hooks.append((kind, function))


KPATCH_SECTIONS = (".kpatch.ignore.functions", ".kpatch.ignore.sections", ".kpatch.force")


def kpatch_marks(obj: ObjectFile) -> dict[str, set[str]]:
    """What kpatch-macros.h's KPATCH_IGNORE_FUNCTION, KPATCH_IGNORE_SECTION and
    KPATCH_FORCE_UNSAFE marked in `obj`: function names, section names, function names."""
    out: dict[str, set[str]] = {name: set() for name in KPATCH_SECTIONS}
    for sec in obj.sections:
        if sec is not None and sec.name in out:
            out[sec.name] |= {obj.target(r).name for r in sec.relocs}
    return out


def section_kind(name: str) -> str:
    if name.startswith(INIT_SECTION_PREFIXES):
        return "init"
    if name.startswith(EXIT_SECTION_PREFIXES):
        return "exit"
    return "normal"


def correlate(pre: ObjectFile, post: ObjectFile) -> dict[str, str]:
    """Map post item names to pre item names: equal names first, then compiler-numbered names
    (foo.isra.0, rs.12, __func__.3) by base name, by equal contents, then by order."""
    mapping: dict[str, str] = {}
    pre_by_base: dict[tuple[str, str], list[Item]] = defaultdict(list)
    post_by_base: dict[tuple[str, str], list[Item]] = defaultdict(list)
    pre_names = {i.name for i in pre.items}
    for item in pre.items:
        pre_by_base[(item.symbol.type, base_name(item.name))].append(item)
    for item in post.items:
        if item.name in pre_names and base_name(item.name) == item.name:
            mapping[item.name] = item.name
        else:
            post_by_base[(item.symbol.type, base_name(item.name))].append(item)
    for key, posts in post_by_base.items():
        pres = [i for i in pre_by_base.get(key, []) if i.name not in mapping.values()]
        # Equal contents first (string constants such as __func__.N, static locals' initial values,
        # dynamic debug descriptors).
        if key[0] == "STT_OBJECT":
            pre_keys = {p.name: _content_key(pre, p) for p in pres}
            post_keys = {i.name: _content_key(post, i) for i in posts}
        alike: dict[tuple, list[Item]] = defaultdict(list)  # posts with several equal pres
        for item in list(posts):
            if key[0] == "STT_OBJECT":
                same = [p for p in pres if pre_keys[p.name] == post_keys[item.name]]
            else:
                same = [p for p in pres if p.data == item.data and p.size == item.size]
            if len(same) > 1 and key[0] == "STT_OBJECT":
                alike[post_keys[item.name]].append(item)
            elif len(same) == 1 or (same and same[0].name == item.name):
                mapping[item.name] = same[0].name
                pres.remove(same[0])
                posts.remove(item)
        # Objects of equal contents (lockdep's zero-size __key.N): in the order of their numbers,
        # not by name. A static local added above them renumbers them all (one counter per
        # file, in source order), so __key.23 after the patch is __key.22 before it.
        for content, group in alike.items():
            equal = [p for p in pres if pre_keys[p.name] == content]
            for item, p in zip(sorted(group, key=_number_order), sorted(equal, key=_number_order)):
                mapping[item.name] = p.name
                pres.remove(p)
                posts.remove(item)
        for item in list(posts):  # then the same name, then symbol-table order
            exact = [p for p in pres if p.name == item.name]
            if exact:
                mapping[item.name] = exact[0].name
                pres.remove(exact[0])
                posts.remove(item)
        for item, p in zip(posts, pres):
            mapping[item.name] = p.name
    return mapping


def _number_order(item: Item) -> tuple[int, str]:
    """Where the compiler numbered a static local (__key.22 -> 22): its place in the source. A
    BTF_ID() slot's number glues __COUNTER__ to __LINE__; its place in .BTF_ids is the order."""
    if item.name.startswith("__BTF_ID__"):
        return (item.start, item.name)
    number = item.name.rsplit(".", 1)[-1]
    return (int(number) if number.isdigit() else -1, item.name)


def _content_key(obj: ObjectFile, item: Item) -> tuple:
    """What a data object holds, independent of the names the compiler numbered: its bytes (with
    relocation fields and a dynamic debug descriptor's line number masked), and what each relocation
    points at: strings and read-only objects by their contents, anything else by base name."""
    data = bytearray(_mask_line(item, item.data))
    targets: list[tuple] = []
    for r in item.relocs:
        off = r.offset - item.start
        data[off:off + r.width] = bytes(r.width)
        t = obj.target(r)
        ref = obj.data_objects.get(t.name) if t.kind == "sym" else None
        if ref is not None and read_only(ref):
            targets.append((off, r.type, "data", ref.data, t.offset))
        else:
            targets.append((off, r.type, t.kind, base_name(t.name) if t.kind == "sym" else t.name,
                            t.offset))
    return item.size, bytes(data), tuple(targets)


def _mask_line(item: Item, data: bytes) -> bytes:
    if item.section.name != DYNDBG_SECTION or len(data) < DYNDBG_LINENO[0] + 4:
        return data
    off, mask = DYNDBG_LINENO
    word = int.from_bytes(data[off:off + 4], "little") & ~mask
    return data[:off] + word.to_bytes(4, "little") + data[off + 4:]


def read_only(item: Item) -> bool:
    return not item.section.flags & SH_FLAGS.SHF_WRITE


def _copyable(item: Item) -> bool:
    """Data the new code may use a copy of: nothing outside this object can reach it, and either
    nothing writes it or it is a dynamic debug descriptor (whose flags only debugfs writes)."""
    return item.symbol.bind == "STB_LOCAL" and (read_only(item) or
                                                item.section.name == DYNDBG_SECTION)


def signature(obj: ObjectFile, item: Item, rename) -> tuple[bytes, list[tuple]]:
    """The item's bytes with relocation fields zeroed, and its relocations (plus the entries of
    the kernel's tables that point into it) as comparable tuples."""
    data = bytearray(item.data)
    relocs: list[tuple] = []
    for r in item.relocs:
        off = r.offset - item.start
        data[off:off + r.width] = bytes(r.width)
        relocs.append((off, r.type, *_norm(obj.target(r), rename)))
    for table in CODE_TABLES:
        if table in ("__mcount_loc", ".orc_unwind_ip", "__bug_table"):
            continue  # say nothing the code does not already say (__bug_table holds __LINE__)
        sec = obj.section(table)
        if sec is None:
            continue
        entry = table_entry_size(obj, table)
        for site_sec, site_off, idx in obj.sites(table, entry):
            if site_sec is item.section and item.start <= site_off < item.start + item.size:
                fields: list[tuple] = []
                for r in sec.relocs_in(idx * entry, (idx + 1) * entry):
                    t = obj.target(r)
                    if t.kind == "sym" and t.name == item.name:  # self reference: keep the offset
                        fields.append((r.offset % entry, "self", t.offset))
                    else:
                        fields.append((r.offset % entry, *_norm(t, rename)))
                raw = sec.data[idx * entry:(idx + 1) * entry]
                if table == ".altinstructions":  # what follows the two offsets, the code
                    fields.append(("alt", raw[8:], _alt_replacement(obj, sec, idx, entry)))
                relocs.append((table, site_off - item.start, tuple(fields)))
    return bytes(data), relocs


def _alt_replacement(obj: ObjectFile, alt, idx: int, entry: int) -> bytes:
    for r in alt.relocs_in(idx * entry + 4, idx * entry + 5):
        sec = r.symbol.section
        if sec is not None:
            # The field is PC-relative to itself, so the replacement starts at S + A; its
            # length is the entry's last byte (replacementlen).
            start = r.symbol.value + r.addend
            length = alt.data[idx * entry + entry - 1]
            return bytes(sec.data[start:start + length])
    return b""


def _norm(target: RelocTarget, rename) -> tuple:
    if target.kind == "sym":
        return ("sym", rename(target.name), target.offset)
    return (target.kind, target.name, target.offset)


def _only_line_numbers_differ(pre: ObjectFile, pre_item: Item, post: ObjectFile, post_item: Item,
                              pre_sig, post_sig) -> bool:
    """True when the code differs only in 32-bit immediates loaded right before a call to a
    function that takes (file, line): a patch that moved lines, nothing else."""
    if pre_sig[1] != post_sig[1] or len(pre_sig[0]) != len(post_sig[0]):
        return False
    try:
        from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    except ImportError:
        return False
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    a = list(md.disasm(pre_sig[0], 0))
    b = list(md.disasm(post_sig[0], 0))
    if len(a) != len(b):
        return False
    calls = {r.offset - post_item.start: post.target(r) for r in post_item.relocs}
    for i, (x, y) in enumerate(zip(a, b)):
        if x.bytes == y.bytes:
            continue
        if not (_is_mov_imm(x) and _is_mov_imm(y) and x.size == y.size
                and x.op_str.split(",")[0] == y.op_str.split(",")[0]):
            return False
        # The next call (within a few instructions) must go to a line-taking function.
        for z in b[i + 1:i + 6]:
            if z.mnemonic == "call":
                target = calls.get(z.address + 1)
                if target is None or base_name(target.name) not in LINE_TAKING_FUNCTIONS:
                    return False
                break
        else:
            return False
    return True


def _is_mov_imm(insn) -> bool:
    """`mov reg, imm` (capstone's Intel syntax)."""
    if insn.mnemonic != "mov":
        return False
    operands = [o.strip() for o in insn.op_str.split(",")]
    try:
        int(operands[1], 0)
    except (IndexError, ValueError):
        return False
    return "[" not in operands[0]


def diff_objects(pre: ObjectFile, post: ObjectFile, name: str, module: str | None = None
                 ) -> ObjectDiff:
    """What changed between the pre and post builds of object `name`, linked into vmlinux or,
    with `module`, into that module."""
    diff = ObjectDiff(name)
    names = correlate(pre, post)
    diff.names = names
    pre_funcs, post_funcs = pre.functions, post.functions

    post_items = {i.name for i in post.items}

    def rename_post(n: str) -> str:  # undefined symbols keep their names
        return names.get(n, "new:" + n) if n in post_items else n

    def same_name(n: str) -> str:
        return n

    # Changed data the new code can have a copy of becomes new data: uncorrelated, so that every
    # function referring to it differs; copies can make more copies. A read-only object that can
    # be rewritten in place is, unless it is a plain constant only code uses: an ops table's
    # address is held by the kernel (open files, registered families), so only the same
    # address with new contents reaches every user.
    while True:
        changed_data = _changed_data(pre, post, names, rename_post)
        plans = {d: _plan_rewrite(pre, pre.data_objects[names[d]], post, post.data_objects[d],
                                  rename_post, module) for d in changed_data}
        copies = [d for d in changed_data if _copyable(post.data_objects[d]) and (
            not isinstance(plans[d], DataRewrite) or _code_only_constant(post, d))]
        if not copies:
            break
        for dname in copies:
            diff.notes.append(f"{dname}: changed {post.data_objects[dname].section.name} data, "
                              "the new code gets its own copy")
            del names[dname]

    marks = kpatch_marks(post)
    ignored = marks[".kpatch.ignore.functions"]
    ignored_sections = marks[".kpatch.ignore.sections"]
    for fname in sorted(marks[".kpatch.force"]):
        diff.notes.append(f"{fname}: KPATCH_FORCE_UNSAFE is not honoured: livesplice checks that "
                          "no thread is inside every function it replaces")
    changed_units: dict[str, set[str]] = {}  # unit (parent function) -> changed members
    for fname, item in post_funcs.items():
        unit = fname[:-len(".cold")] if fname.endswith(".cold") else fname
        if unit in ignored or item.section.name in ignored_sections:
            diff.notes.append(f"{fname}: left out, as KPATCH_IGNORE_"
                              f"{'FUNCTION' if unit in ignored else 'SECTION'} asks")
            continue
        pre_name = names.get(fname)
        kind = section_kind(item.section.name)
        if pre_name is None or pre_name not in pre_funcs:
            if kind == "normal":
                diff.new.append(FunctionChange(fname, None, item.section.name, item.size))
            continue
        pre_item = pre_funcs[pre_name]
        pre_sig = signature(pre, pre_item, same_name)
        post_sig = signature(post, item, rename_post)
        if pre_sig == post_sig:
            continue
        if _only_line_numbers_differ(pre, pre_item, post, item, pre_sig, post_sig):
            diff.line_only.append(fname)
            continue
        if kind == "init" and module:
            diff.refusals.append(f"{name}: changed __init function {fname} of module {module}: "
                                 "it has run in a loaded module, and livesplice does not update "
                                 "the init code a later load runs")
            continue
        if kind == "init":
            diff.refusals.append(f"{name}: changed __init function {fname} ({item.section.name}): "
                                 "init code has already run and cannot be updated live")
            continue
        if kind == "exit" and module:
            diff.refusals.append(f"{name}: changed __exit function {fname} of module {module}: "
                                 "livesplice does not update a module's exit code")
            continue
        if kind == "exit":
            diff.notes.append(f"{fname}: changed exit code, discarded in a built-in kernel")
            continue
        parent = fname[:-len(".cold")] if fname.endswith(".cold") else fname
        changed_units.setdefault(parent, set()).add(fname)

    for parent, members in sorted(changed_units.items()):
        parent_item = post_funcs.get(parent)
        pre_name = names.get(parent)
        if parent_item is None or pre_name is None or pre_name not in pre_funcs:
            diff.refusals.append(f"{name}: {', '.join(sorted(members))} changed but its parent "
                                 f"function {parent} is not in both objects")
            continue
        pre_item = pre_funcs[pre_name]
        reason = _unredirectable(pre, pre_item)
        if reason:
            diff.refusals.append(f"{name}: cannot redirect changed function {parent}: {reason}")
            continue
        parts = [n for n in (parent + ".cold",) if n in post_funcs]
        diff.changed.append(FunctionChange(parent, pre_name, parent_item.section.name,
                                           parent_item.size, pre_item.size, parts))
    # A .cold part whose parent is new goes with its parent.
    new_names = {c.name for c in diff.new}
    for c in list(diff.new):
        if c.name.endswith(".cold") and c.name[:-5] in new_names:
            diff.new.remove(c)
            next(n for n in diff.new if n.name == c.name[:-5]).parts.append(c.name)
    diff.refusals += _boot_table_entries(post, {c.name for c in diff.new}, name)
    # Parts of changed functions are carried with them, never redirected on their own.
    for c in diff.changed:
        diff.new = [n for n in diff.new if n.name not in c.parts]

    for dname in changed_data:  # what is left is data no copy can stand in for
        plan = plans[dname]
        if isinstance(plan, DataRewrite):
            diff.rewrites.append(plan)
            continue
        item, pre_item = post.data_objects[dname], pre.data_objects[names[dname]]
        what = (f"size {pre_item.size} -> {item.size}" if pre_item.size != item.size
                else "contents differ")
        diff.refusals.append(f"{name}: changed data object {dname} in {item.section.name} "
                             f"({what}): {plan}")
    diff.new_data = [d for d in post.data_objects if d not in names]
    diff_hooks(pre, post, name, diff)
    return diff


def _code_only_constant(post: ObjectFile, dname: str) -> bool:
    """A local read-only object without pointers that no other data points to: a copy for the
    new code is as good as the kernel's, and writes nothing live."""
    item = post.data_objects[dname]
    if item.relocs or item.symbol.bind != "STB_LOCAL":
        return False
    return not any(post.target(r).name == dname for other in post.data_objects.values()
                   if other is not item for r in other.relocs)


def _plan_rewrite(pre: ObjectFile, pre_item: Item, post: ObjectFile, item: Item, rename_post,
                  module: str | None) -> DataRewrite | str:
    """How `item` is rewritten in place, or why it cannot be."""
    sec = item.section.name
    ro_after_init = sec == RO_AFTER_INIT_SECTION == pre_item.section.name
    if not ro_after_init and not (read_only(item) and read_only(pre_item)):
        return "live data cannot be rewritten safely (it is writable at run time)"
    if not ro_after_init and not sec.startswith(".rodata"):
        return f"live data cannot be rewritten safely (livesplice rewrites .rodata and " \
               f"__ro_after_init objects, not {sec})"
    if item.section.flags & SH_FLAGS.SHF_MERGE or pre_item.section.flags & SH_FLAGS.SHF_MERGE:
        return "live data cannot be rewritten safely (a mergeable constant: the linker may " \
               "share its bytes with other objects' equal ones)"
    if pre_item.size != item.size:
        return "live data cannot be rewritten safely (a rewrite in place keeps the size)"
    if module is not None:
        return f"live data cannot be rewritten safely (a rewrite in place is for vmlinux's " \
               f"data; module {module} may load again with the old contents)"
    if item.section.type == "SHT_NOBITS" or pre_item.section.type == "SHT_NOBITS":
        return "live data cannot be rewritten safely (no contents in the object file)"
    changed = bytearray(item.size)
    fields: dict[int, list] = defaultdict(lambda: [None, None])
    for side, (obj, it, rename) in enumerate(((pre, pre_item, lambda n: n),
                                              (post, item, rename_post))):
        for r in it.relocs:
            fields[r.offset - it.start][side] = (r.type, r.width, _norm(obj.target(r), rename))
    pointers = set()
    for off, (a, b) in sorted(fields.items()):
        if a == b:
            continue
        for f in (a, b):
            if f is not None and f[0] != ABS64:
                return (f"live data cannot be rewritten safely (the field at offset {off} is a "
                        f"type {f[0]} relocation, not a pointer)")
        if b is not None and b[2][0] == "sym":
            target = post.functions.get(b[2][1]) or post.data_objects.get(b[2][1])
            if target is not None and section_kind(target.section.name) != "normal":
                return (f"live data cannot be rewritten safely (offset {off} would point to "
                        f"{b[2][1]} in {target.section.name}, which the kernel frees after boot)")
        changed[off:off + 8] = b"\1" * 8
        pointers.add(off)
    pre_bytes, post_bytes = bytearray(pre_item.data), bytearray(item.data)
    for off, (a, b) in fields.items():
        for f in (a, b):
            if f is not None:
                pre_bytes[off:off + f[1]] = post_bytes[off:off + f[1]] = bytes(f[1])
    for i, (x, y) in enumerate(zip(pre_bytes, post_bytes)):
        if x != y:
            changed[i] = 1
    # A pointer starts a range of its own, and a long range is cut only at 8-byte offsets: the
    # core stores each aligned word of a range whole, so no reader sees half a pointer.
    ranges: list[tuple[int, int]] = []
    for i, flag in enumerate(changed):
        if flag and ranges and ranges[-1][0] + ranges[-1][1] == i and i not in pointers and \
                (ranges[-1][1] < MAX_WRITE - 8 or i % 8):
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
        elif flag:
            ranges.append((i, 1))
    if not ranges:
        return ("live data cannot be rewritten safely (what differs is an entry of the kernel's "
                "tables that points into it, not its contents)")
    return DataRewrite(item.name, pre_item.name, pre_item.section.name, item.size, ranges,
                       ro_after_init)


def _changed_data(pre: ObjectFile, post: ObjectFile, names: dict[str, str], rename_post) -> list[str]:
    """Post data objects correlated with a pre object whose contents or references differ."""
    out = []
    for dname, item in post.data_objects.items():
        pre_item = pre.data_objects.get(names.get(dname, ""))
        if pre_item is None:
            continue
        pre_data, pre_relocs = signature(pre, pre_item, lambda n: n)
        post_data, post_relocs = signature(post, item, rename_post)
        if pre_relocs != post_relocs or \
                _mask_line(pre_item, pre_data) != _mask_line(item, post_data):
            out.append(dname)
    return out


def _boot_table_entries(post: ObjectFile, new_functions: set[str], name: str) -> list[str]:
    """New functions entered in a table the kernel walks at boot or on its own events (PCI
    fixups, initcalls, parameters, ...): the running kernel has read that table and will never
    call them, so the update would silently not do what the patch says."""
    out = []
    for sec in post.sections:
        if sec is None or not sec.is_alloc or sec.flags & SH_FLAGS.SHF_EXECINSTR \
                or sec.name in CODE_TABLES or sec.name.startswith(EXPORT_TABLES) \
                or sec.name.startswith(HOOK_SECTION_PREFIX) or sec.name in KPATCH_SECTIONS:
            continue  # a new export only matters to modules loaded later: left out
        if sec.name.startswith((".rodata", ".data")):
            continue  # the compiler's own anonymous data (jump tables) goes with the code
        for r in sec.relocs:
            t = post.target(r)
            if t.kind == "sym" and t.name in new_functions and post.item_at(sec, r.offset) is None:
                out.append(f"{name}: new function {t.name} is entered in {sec.name}, a table "
                           "the running kernel has already read: it would never be called")
    return sorted(set(out))


def jump_offset(fentry: int | None, code: bytes) -> int:
    """Where in a function apply writes its jump: after its ENDBR (IBT: indirect calls land on
    it, sealed or not) and a fentry call right after it, else at the entry (a notrace function).
    `code`: the function's first bytes."""
    endbr = len(ENDBR64) if code[:len(ENDBR64)] == ENDBR64 else 0
    return fentry + JUMP_SIZE if fentry == endbr else endbr


def _unredirectable(obj: ObjectFile, item: Item) -> str | None:
    for prefix, why in UNREDIRECTABLE_SECTIONS.items():
        if item.section.name.startswith(prefix):
            return why
    fentry = fentry_offset(obj, item)
    at = jump_offset(fentry, item.data)
    if item.size - at < JUMP_SIZE:
        return f"{item.size} bytes leave no room for a {JUMP_SIZE}-byte jump after its fentry site"
    under = [s for s in runtime_patched_sites(obj, item)
             if s.offset < at + JUMP_SIZE and at < s.offset + s.length]
    rewritten = [s for s in under if s.kind not in SITES_PATCHED_AT_BOOT]
    if rewritten:
        return "; ".join(_site_under_jump(s, at) for s in rewritten)
    return None


def _site_under_jump(site: RuntimeSite, at: int) -> str:
    what = site.what
    if what.startswith("__SCK__"):
        what = f" to {what[len('__SCK__'):]}"
    elif what:
        what = f" on {what}"
    size = f"{site.length} byte{'s' if site.length != 1 else ''}"
    return (f"its {site.kind} site{what} at offset {site.offset:#x} ({size}) lies "
            f"under the {JUMP_SIZE}-byte jump at offset {at:#x}, and the kernel rewrites that "
            "site while it runs")
