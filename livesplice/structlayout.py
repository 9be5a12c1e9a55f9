"""Struct and union layouts, from the objects' DWARF type information, and their changes.

A patch that adds a member to a struct changes no data object and shows up only as many changed
functions; applying it live would make new code read old objects with the new layout. So every
struct and union that both the pre and the post object describe is compared: size, and each
member's offset and type.

A header's struct is described by the DWARF of the objects that use it (and only those), so to
see a header patch's layout change early, create first builds one object whose source names a
struct the patch edits (`structs_at_lines` finds which, from the header's text).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

from .elfmodel import ObjectFile


@dataclass(frozen=True)
class Layout:
    kind: str  # struct or union
    size: int
    members: tuple[tuple[str, int | str, str], ...]  # (name, byte offset or "bit N", type)


def _type_name(die, depth: int = 0) -> str:
    if die is None or depth > 8:
        return "void"
    tag = die.tag
    name = die.attributes.get("DW_AT_name")
    name = name.value.decode(errors="replace") if name else None
    inner = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
    if tag == "DW_TAG_pointer_type":
        return _type_name(inner, depth + 1) + "*"
    if tag in ("DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type",
               "DW_TAG_atomic_type"):
        return tag[7:-5] + " " + _type_name(inner, depth + 1)
    if tag == "DW_TAG_array_type":
        dims = []
        for child in die.iter_children():
            if child.tag == "DW_TAG_subrange_type":
                ub = child.attributes.get("DW_AT_upper_bound")
                count = child.attributes.get("DW_AT_count")
                dims.append(str(ub.value + 1) if ub and isinstance(ub.value, int)
                            else str(count.value) if count and isinstance(count.value, int) else "")
        return _type_name(inner, depth + 1) + "".join(f"[{d}]" for d in dims)
    if tag in ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_enumeration_type"):
        size = die.attributes.get("DW_AT_byte_size")
        kind = {"DW_TAG_structure_type": "struct", "DW_TAG_union_type": "union"}.get(tag, "enum")
        return f"{kind} {name or '<anonymous>'}" + (f"/{size.value}" if size and not name else "")
    if tag == "DW_TAG_subroutine_type":
        return "function"
    return name or tag


# Reading an object's DWARF takes seconds: once per object.
_layouts: weakref.WeakKeyDictionary[ObjectFile, dict[str, Layout]] = weakref.WeakKeyDictionary()


def layouts(obj: ObjectFile) -> dict[str, Layout]:
    """Named structs and unions defined (not just declared) in the object's DWARF."""
    if obj not in _layouts:
        _layouts[obj] = _read_layouts(obj)
    return _layouts[obj]


def _read_layouts(obj: ObjectFile) -> dict[str, Layout]:
    elf = obj.elf
    if not elf.has_dwarf_info():
        return {}
    out: dict[str, Layout] = {}
    for cu in elf.get_dwarf_info().iter_CUs():
        for die in cu.iter_DIEs():
            if die.tag not in ("DW_TAG_structure_type", "DW_TAG_union_type"):
                continue
            attrs = die.attributes
            if "DW_AT_name" not in attrs or "DW_AT_declaration" in attrs \
                    or "DW_AT_byte_size" not in attrs:
                continue
            kind = "struct" if die.tag == "DW_TAG_structure_type" else "union"
            name = f"{kind} {attrs['DW_AT_name'].value.decode(errors='replace')}"
            if name in out:
                continue
            members = []
            for child in die.iter_children():
                if child.tag != "DW_TAG_member":
                    continue
                cattrs = child.attributes
                mname = cattrs["DW_AT_name"].value.decode(errors="replace") \
                    if "DW_AT_name" in cattrs else "<anonymous>"
                offset: int | str
                if "DW_AT_data_bit_offset" in cattrs:
                    offset = f"bit {cattrs['DW_AT_data_bit_offset'].value}"
                elif "DW_AT_data_member_location" in cattrs:
                    offset = cattrs["DW_AT_data_member_location"].value
                else:
                    offset = 0
                mtype = _type_name(child.get_DIE_from_attribute("DW_AT_type")) \
                    if "DW_AT_type" in cattrs else "?"
                members.append((mname, offset, mtype))
            out[name] = Layout(kind, attrs["DW_AT_byte_size"].value, tuple(members))
    return out


def describe_change(name: str, pre: Layout, post: Layout) -> str:
    parts = []
    if pre.size != post.size:
        parts.append(f"size {pre.size} -> {post.size}")
    pre_m = {m[0]: m for m in pre.members}
    post_m = {m[0]: m for m in post.members}
    added = [m for m in post_m if m not in pre_m]
    removed = [m for m in pre_m if m not in post_m]
    if added:
        parts.append("added " + ", ".join(f"{m} (offset {post_m[m][1]})" for m in added))
    if removed:
        parts.append("removed " + ", ".join(removed))
    for m, (_, po, pt) in pre_m.items():
        if m in post_m and pre_m[m] != post_m[m]:
            _, qo, qt = post_m[m]
            if po != qo:
                parts.append(f"{m} moved {po} -> {qo}")
            if pt != qt:
                parts.append(f"{m} type {pt} -> {qt}")
    if not parts:
        parts.append("member order changed")
    return f"{name}: " + "; ".join(parts)


def layout_changes(pre: ObjectFile, post: ObjectFile) -> list[str]:
    a, b = layouts(pre), layouts(post)
    return [describe_change(n, a[n], b[n]) for n in sorted(set(a) & set(b)) if a[n] != b[n]]


def layout_refusals(objname: str, pre: ObjectFile, post: ObjectFile) -> list[str]:
    """create's refusal of each struct or union whose layout differs between pre and post."""
    return [f"{objname}: changed layout of {c}" for c in layout_changes(pre, post)]


# What brace counting must not see: comments, string and character literals, and preprocessor
# lines (a macro's braces are not the file's).
_NOT_CODE = re.compile(r"/\*.*?\*/|//[^\n]*|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'"
                       r"|^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", re.DOTALL | re.MULTILINE)
_BRACE = re.compile(r"\b(struct|union)\s+(\w+)\s*\{|[{}]")


def structs_at_lines(text: str, positions: set[float]) -> set[str]:
    """The named structs and unions ("struct foo") whose definitions in a C header's `text` hold
    any of `positions`: line numbers (1-based), or a line number plus 0.5 for a place between two
    lines (where a patch inserts). The definitions are found by counting braces."""
    code = _NOT_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    stack: list[tuple[str | None, int]] = []
    spans: list[tuple[str, int, int]] = []
    line, counted = 1, 0
    for m in _BRACE.finditer(code):
        line += code.count("\n", counted, m.start())
        counted = m.start()
        if m.group(0) == "}":
            if stack:
                name, start = stack.pop()
                if name is not None:
                    spans.append((name, start, line))
        else:
            stack.append((f"{m.group(1)} {m.group(2)}" if m.group(1) else None, line))
    return {name for name, start, end in spans if any(start <= p <= end for p in positions)}
