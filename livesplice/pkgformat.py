"""The update package's contents as typed records: `Manifest` (manifest.json) and `PreCode`
(pre.json), one definition each, used by create, package, run-pre matching, apply and the CLI.

Each record is a dataclass whose fields carry their JSON check (`spec`), so the schema a reader
enforces and the type a writer fills are the same lines. Reading is strict: every field present
(a new field is a new format, never an optional one), of its type and well-formed, nothing
unknown; the first problem is reported naming the field ("manifest field replaced[2].name:
expected a string"). docs/package-format.md describes every field and how versions evolve.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypeVar

from .elfmodel import SITE_KINDS, reloc_width
from .errors import BadInput

# 6: read-only objects of vmlinux rewritten in place (`rewrites`, and their pre contents in
#    pre.json's `objects`).
# 5: the patch author's hooks (`hooks`).
# 4: module targets: symbols of a module are named by (name, `sympos`), their position among
#    the module's symbols of that name; the new code's fields that refer into a module are `held`
#    (left unrelocated in the module; the core writes them whenever that module is patched).
# 3: objects patched are named per function (`target`: vmlinux or a module) and listed in
#    `targets` with their build ids; the running kernel is `kernel` (was `target`).
# 2: build id of the kernel, core protocol 2, signatures.
FORMAT_VERSION = 6
READABLE_VERSIONS = (2, 3, 4, 5, 6)  # older ones are upgraded on reading (`_upgrade`)
VMLINUX = "vmlinux"  # the `target` of functions built into the kernel image
PLACEHOLDER_PREFIX = "__livesplice_sym_"  # how the new code names what the kernel has
MODULE_PREFIX = "livesplice_"  # an update's module is livesplice_ID (ID with '-' as '_')

MiB = 1024 * 1024
MAX_MANIFEST_BYTES = 4 * MiB  # manifest.json, mostly the patch text (so the patch's cap too)
MAX_PRE_BYTES = 8 * MiB  # pre.json (so the cap of one function's base64 code too)
MAX_FUNCTION_SIZE = 16 * MiB  # bytes of one function
MAX_LIST = 100_000  # entries of any list


# --- checks: each raises Invalid naming the field ------------------------------------------------

class Invalid(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


Check = Callable[[Any, str], None]


def show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def sub(field: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{field}[{key}]"
    return f"{field}.{key}" if field else key


def string(pattern: str | None = None, what: str = "", max_len: int = 4096,
           nullable: bool = False, printable: bool = False) -> Check:
    regex = re.compile(pattern) if pattern else None

    def check(value: Any, field: str) -> None:
        if value is None and nullable:
            return
        if not isinstance(value, str):
            raise Invalid(field, "expected a string" + (" or null" if nullable else ""))
        if len(value) > max_len:
            raise Invalid(field, f"longer than {max_len} characters")
        if regex is not None and not regex.fullmatch(value):
            raise Invalid(field, f"{show(value)} is not {what}")
        if printable and not value.isprintable():
            raise Invalid(field, f"{show(value)} has control characters")
    return check


def integer(lo: int, hi: int, nullable: bool = False) -> Check:
    def check(value: Any, field: str) -> None:
        if value is None and nullable:
            return
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(field, "expected an integer" + (" or null" if nullable else ""))
        if not lo <= value <= hi:
            raise Invalid(field, f"{value} is not in {lo}..{hi}")
    return check


def boolean(value: Any, field: str) -> None:
    if not isinstance(value, bool):
        raise Invalid(field, "expected true or false")


def choice(*options: str) -> Check:
    def check(value: Any, field: str) -> None:
        if not isinstance(value, str) or value not in options:
            raise Invalid(field, f"expected one of {', '.join(options)}, not {show(value)}")
    return check


def list_of(item: Check, min_len: int = 0, max_len: int = MAX_LIST) -> Check:
    def check(value: Any, field: str) -> None:
        if not isinstance(value, list):
            raise Invalid(field, "expected a list")
        if not min_len <= len(value) <= max_len:
            raise Invalid(field, f"{len(value)} entries, expected {min_len} to {max_len}")
        for i, v in enumerate(value):
            item(v, sub(field, i))
    return check


def object_path(value: Any, field: str) -> None:
    """An object file's path in the tree: relative, printable ASCII, no spaces, no '..'."""
    string(r"[!-~]{1,4096}", "a path without spaces or control characters")(value, field)
    parts = value.split("/")
    if value.startswith("/") or ".." in parts or "" in parts or "." in parts:
        raise Invalid(field, f"{show(value)} is not a relative path inside the tree")


def object_path_or_empty(value: Any, field: str) -> None:
    if value != "":
        object_path(value, field)


ID = r"[A-Za-z0-9_-]{1,40}"
HEX64 = r"[0-9a-f]{64}"
RELEASE = r"[A-Za-z0-9._+~-]{1,64}"
SYMBOL = string(r"[!-~]{1,512}", "a symbol name (printable, no spaces or control characters)")
SHA256 = string(HEX64, "a SHA-256 in hex")
BUILD_ID = string(r"[0-9a-f]{2,128}", "a GNU build id in hex", nullable=True)
# vmlinux or a module's name as the kernel knows it (lsmod: '-' are '_')
TARGET_NAME = string(r"vmlinux|[A-Za-z0-9_]{1,55}", "vmlinux or a module name")
CODE_SIZE = integer(1, MAX_FUNCTION_SIZE)
SIZE = integer(0, MAX_FUNCTION_SIZE)
OFFSET = integer(0, MAX_FUNCTION_SIZE)


# --- records -------------------------------------------------------------------------------------

def spec(check: Check) -> Any:
    """A dataclass field with its JSON check."""
    return field(metadata={"check": check})


R = TypeVar("R", bound="Record")


class Record:
    """A JSON object (or, with POSITIONAL, a fixed-length list) of checked fields."""

    POSITIONAL: ClassVar[bool] = False

    @classmethod
    def check(cls, value: Any, where: str) -> None:
        specs = dataclasses.fields(cls)  # type: ignore[arg-type]
        if cls.POSITIONAL:
            if not isinstance(value, list) or len(value) != len(specs):
                raise Invalid(where, f"expected a list of {len(specs)} "
                                     f"({', '.join(f.name for f in specs)})")
            for i, f in enumerate(specs):
                f.metadata["check"](value[i], f"{where}[{i}] ({f.name})")
            return
        if not isinstance(value, dict):
            raise Invalid(where or "(top level)", "expected an object")
        for f in specs:
            if f.name not in value:
                raise Invalid(sub(where, f.name), "missing")
            f.metadata["check"](value[f.name], sub(where, f.name))
        names = {f.name for f in specs}
        for key in value:
            if key not in names:
                shown = key if re.fullmatch(r"[A-Za-z0-9_]{1,80}", key) else show(key)
                raise Invalid(sub(where, shown), "unknown field")

    @classmethod
    def from_json(cls: type[R], value: Any) -> R:
        """The record of checked JSON (see `check`)."""
        specs = dataclasses.fields(cls)  # type: ignore[arg-type]
        if cls.POSITIONAL:
            return cls(*(_convert(f, v) for f, v in zip(specs, value)))
        return cls(**{f.name: _convert(f, value[f.name]) for f in specs})

    def to_json(self) -> Any:
        specs = dataclasses.fields(self)  # type: ignore[arg-type]
        values = [_dump(getattr(self, f.name)) for f in specs]
        if self.POSITIONAL:
            return values
        return {f.name: v for f, v in zip(specs, values)}


def record(cls: type[Record]) -> Check:
    def check(value: Any, where: str) -> None:
        cls.check(value, where)
    check.record = cls  # type: ignore[attr-defined]
    return check


def records(cls: type[Record], min_len: int = 0) -> Check:
    check = list_of(record(cls), min_len)
    check.records = cls  # type: ignore[attr-defined]
    return check


def _convert(f: dataclasses.Field, value: Any) -> Any:
    check = f.metadata["check"]
    if hasattr(check, "record"):
        return check.record.from_json(value)
    if hasattr(check, "records"):
        return [check.records.from_json(v) for v in value]
    return value


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


@dataclass
class KernelIdentity(Record):
    """The running kernel an update is for."""

    release: str = spec(string(RELEASE, "a kernel release (6.1.0-53-amd64)"))
    # the image's version banner (release (builder) #N ...), if known
    version: str | None = spec(string(max_len=512, nullable=True, printable=True))
    stock: str | None = spec(string(RELEASE, "a kernel release (6.1.0-53-amd64)", nullable=True))
    # vmlinux's GNU build id: the identity apply checks (None: a self-built kernel whose vmlinux
    # was not at hand; apply then compares the release and the version banner)
    build_id: str | None = spec(BUILD_ID)
    # built with X86_KERNEL_IBT (format 6): a function called indirectly must start with ENDBR
    ibt: bool = spec(boolean)


@dataclass
class PatchedObject(Record):
    """A kernel object the update changes code in: vmlinux or a loadable module."""

    name: str = spec(TARGET_NAME)
    build_id: str | None = spec(BUILD_ID)


@dataclass
class Source(Record):
    tree: str = spec(string(printable=True))
    debian_version: str | None = spec(string(r"[A-Za-z0-9.+~:-]{1,64}", "a Debian version",
                                             nullable=True))
    kernelversion: str = spec(string(RELEASE, "a kernel version (6.1.187)"))


@dataclass
class ModuleFile(Record):
    name: str = spec(string(r"livesplice_[A-Za-z0-9_]{1,40}", "a livesplice_ID module name"))
    file: str = spec(string(r"modules/livesplice_[A-Za-z0-9_]{1,40}\.ko", "modules/NAME.ko"))


@dataclass
class ReplacedFunction(Record):
    """A function whose code changed: a jump at its start will lead to `new_section`."""

    target: str = spec(TARGET_NAME)
    object: str = spec(object_path)  # the object file it is built from (kernel/sys.o)
    name: str = spec(SYMBOL)  # its symbol in the pre object (and in the running kernel)
    new_name: str = spec(SYMBOL)  # its symbol in the post object
    size: int = spec(CODE_SIZE)
    new_size: int = spec(SIZE)
    section: str = spec(SYMBOL)  # its section in the post object
    parts: list[str] = spec(list_of(SYMBOL))  # pre symbols of its split-off parts (.cold)
    new_parts: list[str] = spec(list_of(SYMBOL))
    new_section: str = spec(SYMBOL)  # the update module's section of the new code
    new_part_sections: list[str] = spec(list_of(SYMBOL))
    pre_sha256: str = spec(SHA256)  # of its pre code with relocated fields zeroed
    local: bool = spec(boolean)  # a static function


@dataclass
class NewFunction(Record):
    """A function the patch adds: carried in the module, nothing jumps to it."""

    target: str = spec(TARGET_NAME)
    object: str = spec(object_path)
    name: str = spec(SYMBOL)
    size: int = spec(SIZE)
    parts: list[str] = spec(list_of(SYMBOL))
    new_section: str = spec(SYMBOL)
    new_part_sections: list[str] = spec(list_of(SYMBOL))


# The patch author's hooks (livesplice.h), in the order an apply and an undo run them.
MAX_HOOKS = 256  # the core's bound (MAX_HOOKS in livesplice_core.c)
HOOK_KINDS = ("pre_apply", "check_apply", "apply", "post_apply", "fail_apply",
              "pre_reverse", "check_reverse", "reverse", "post_reverse", "fail_reverse")


@dataclass
class Hook(Record):
    """A hook of the patch (LIVESPLICE_PRE_APPLY(fn)...): a function of the new code the core runs
    when `target` is switched in or out; several of one kind run in the manifest's order."""

    kind: str = spec(choice(*HOOK_KINDS))
    target: str = spec(TARGET_NAME)
    object: str = spec(object_path)
    function: str = spec(SYMBOL)  # in the post object: a replaced function's new_name, or new
    new_section: str = spec(SYMBOL)  # the update module's section of the function


MAX_REWRITES = 256  # objects of one update rewritten in place
MAX_WRITES = 4096  # their ranges together (the core's MAX_WRITES, w lines)
MAX_WRITE_SIZE = 4096  # bytes of one range (the core's MAX_WRITE_SIZE)
MAX_REWRITE_SIZE = 1 << 20  # bytes of one object rewritten in place


@dataclass
class Range(Record):
    """[offset, length] of bytes within an object."""

    POSITIONAL: ClassVar[bool] = True
    offset: int = spec(integer(0, MAX_REWRITE_SIZE))
    length: int = spec(integer(1, MAX_WRITE_SIZE))


@dataclass
class Rewrite(Record):
    """A read-only object of vmlinux (const or __ro_after_init data) whose contents the patch
    changes, rewritten in place: the bytes of `ranges` take the values the update's module holds
    in `new_section` (the whole object, relocated when the module loads)."""

    target: str = spec(TARGET_NAME)  # vmlinux (module data is not rewritten)
    object: str = spec(object_path)
    name: str = spec(SYMBOL)  # in the pre object and the running kernel
    local: bool = spec(boolean)
    size: int = spec(integer(1, MAX_REWRITE_SIZE))
    section: str = spec(SYMBOL)  # in the pre object (.rodata.NAME, .data..ro_after_init)
    # __ro_after_init: writable during boot (then run-pre matching finds whether boot wrote it)
    ro_after_init: bool = spec(boolean)
    new_section: str = spec(SYMBOL)  # the update module's section of the new contents
    ranges: list[Range] = spec(records(Range, min_len=1))

    def validate(self, where: str) -> None:
        if self.target != VMLINUX:
            raise Invalid(f"{where}.target", f"{show(self.target)}: only vmlinux's data is "
                                             "rewritten in place")
        end = 0
        for i, r in enumerate(self.ranges):
            if r.offset < end:
                raise Invalid(f"{where}.ranges[{i}]", "not after the range before it")
            end = r.offset + r.length
            if end > self.size:
                raise Invalid(f"{where}.ranges[{i}]", f"ends at {end}, past the object's "
                                                      f"{self.size} bytes")


@dataclass
class KernelRef(Record):
    """A placeholder symbol of the new code, to be given the address of what the kernel has."""

    placeholder: str = spec(string(re.escape(PLACEHOLDER_PREFIX) + r"\d{1,9}",
                                   f"a placeholder ({PLACEHOLDER_PREFIX}N)"))
    name: str = spec(SYMBOL)
    object: str = spec(object_path_or_empty)  # a local symbol's object file; "" for a global
    local: bool = spec(boolean)
    kind: str = spec(choice("func", "object", "notype"))
    # where the symbol lives: vmlinux or a module; "" for a global of vmlinux (or wherever the
    # running kernel defines it)
    target: str = spec(string(r"|vmlinux|[A-Za-z0-9_]{1,55}", "vmlinux, a module name or ''"))
    # in a module: its position among the module's symbols of that name (1-based; livepatch's
    # sympos); 0 for a symbol outside the update's targets, found by name
    sympos: int = spec(integer(0, MAX_LIST))
    # the new code takes its address (format 6): it may be called indirectly, so with IBT it
    # must keep its ENDBR (newcode.address_taken)
    address_taken: bool = spec(boolean)


@dataclass
class HeldField(Record):
    """A field of the new code that refers into a module: create left it unrelocated in the
    update's module (its relocation is R_X86_64_NONE there), and the core writes it with the
    address of `placeholder`'s symbol each time `target` is patched, at apply or when it loads."""

    target: str = spec(TARGET_NAME)  # the module whose new code holds the field
    section: str = spec(SYMBOL)  # of the update's module
    offset: int = spec(OFFSET)
    type: int = spec(integer(0, 255))  # R_X86_64_*
    placeholder: str = spec(string(re.escape(PLACEHOLDER_PREFIX) + r"\d{1,9}",
                                   f"a placeholder ({PLACEHOLDER_PREFIX}N)"))
    addend: int = spec(integer(-2**63, 2**63 - 1))


@dataclass
class Manifest(Record):
    """manifest.json: what the update is and what it targets."""

    format: int = spec(integer(FORMAT_VERSION, FORMAT_VERSION))
    id: str = spec(string(ID, "1-40 letters, digits, '-' or '_'"))
    created: str = spec(string(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
                               "a UTC time (2024-01-31T12:00:00Z)"))
    kernel: KernelIdentity = spec(record(KernelIdentity))
    targets: list[PatchedObject] = spec(records(PatchedObject, min_len=1))
    source: Source = spec(record(Source))
    config_sha256: str = spec(SHA256)
    patch: str = spec(string(max_len=MAX_MANIFEST_BYTES))
    module: ModuleFile = spec(record(ModuleFile))
    replaced: list[ReplacedFunction] = spec(records(ReplacedFunction))
    new: list[NewFunction] = spec(records(NewFunction))
    kernel_refs: list[KernelRef] = spec(records(KernelRef))
    held: list[HeldField] = spec(records(HeldField))
    # new-code functions whose address the new code takes: they may still be running after an
    # undo (timers, work items...), so undo needs --force
    callbacks: list[str] = spec(list_of(SYMBOL))
    line_only: list[str] = spec(list_of(SYMBOL))  # changed only in line numbers: left alone
    notes: list[str] = spec(list_of(string(printable=True)))
    hooks: list[Hook] = spec(records(Hook))  # format 5
    rewrites: list[Rewrite] = spec(records(Rewrite))  # format 6

    @staticmethod
    def module_name(update_id: str) -> str:
        return MODULE_PREFIX + update_id.replace("-", "_")

    def target(self, name: str) -> PatchedObject:
        return next(t for t in self.targets if t.name == name)

    def validate(self) -> None:
        """Checks across fields (Invalid naming the first that fails)."""
        module = self.module_name(self.id)
        if module == "livesplice_core":
            raise Invalid("id", "'core' is reserved (the core module is livesplice_core)")
        if self.module.name != module:
            raise Invalid("module.name", f"{show(self.module.name)}, but update {self.id}'s "
                                         f"module is {module}")
        if self.module.file != f"modules/{module}.ko":
            raise Invalid("module.file", f"{show(self.module.file)}, expected "
                                         f"'modules/{module}.ko'")
        _unique([t.name for t in self.targets], "targets")
        if len(self.hooks) > MAX_HOOKS:
            raise Invalid("hooks", f"{len(self.hooks)} entries: the core runs at most {MAX_HOOKS}")
        if not self.replaced and not self.hooks and not self.rewrites:
            raise Invalid("replaced", "empty, and no hooks or rewrites: the update would change "
                                      "nothing")
        if len(self.rewrites) > MAX_REWRITES:
            raise Invalid("rewrites", f"{len(self.rewrites)} entries: at most {MAX_REWRITES}")
        for i, w in enumerate(self.rewrites):
            w.validate(f"rewrites[{i}]")
        if sum(len(w.ranges) for w in self.rewrites) > MAX_WRITES:
            raise Invalid("rewrites", f"more than {MAX_WRITES} ranges together: the core writes "
                                      f"at most {MAX_WRITES}")
        _unique([(w.object, w.name) for w in self.rewrites], "rewrites")
        if VMLINUX in {t.name for t in self.targets} and \
                self.target(VMLINUX).build_id != self.kernel.build_id:
            raise Invalid("targets", "vmlinux's build id is not the kernel's")
        known = {t.name for t in self.targets}
        _unique([(r.object, r.name) for r in self.replaced], "replaced")
        _unique([(r.object, r.name) for r in self.new], "new")
        _unique([r.placeholder for r in self.kernel_refs], "kernel_refs")
        named = [(f"replaced[{i}]", e.target) for i, e in enumerate(self.replaced)]
        named += [(f"new[{i}]", e.target) for i, e in enumerate(self.new)]
        for where, target in named:
            if target not in known:
                raise Invalid(f"{where}.target", f"{show(target)} is not in targets")
        for i, ref in enumerate(self.kernel_refs):
            if ref.local != (ref.object != ""):
                raise Invalid(f"kernel_refs[{i}].object", "a local symbol names its object, "
                                                          "a global one has \"\"")
            if ref.local and ref.target not in known:
                raise Invalid(f"kernel_refs[{i}].target", "a local symbol names one of targets")
            if not ref.local and ref.target == VMLINUX:
                raise Invalid(f"kernel_refs[{i}].target", "a global symbol of vmlinux has \"\"")
            if ref.sympos and (ref.target not in known or ref.target == VMLINUX):
                raise Invalid(f"kernel_refs[{i}].sympos", "a position is within a module target")
        carried = {(r.object, r.new_name): (r.target, r.new_section) for r in self.replaced}
        carried |= {(n.object, n.name): (n.target, n.new_section) for n in self.new}
        for i, hook in enumerate(self.hooks):
            if carried.get((hook.object, hook.function)) != (hook.target, hook.new_section):
                raise Invalid(f"hooks[{i}]", f"{show(hook.function)} of {show(hook.object)} is not "
                                             "a replaced or new function of that target and section")
        refs = {r.placeholder: r for r in self.kernel_refs}
        for i, h in enumerate(self.held):
            held_ref = refs.get(h.placeholder)
            if held_ref is None or held_ref.target in ("", VMLINUX):
                raise Invalid(f"held[{i}].placeholder", f"{show(h.placeholder)} is not a kernel "
                                                        "reference into a module")
            if h.target not in known or h.target == VMLINUX:
                raise Invalid(f"held[{i}].target", f"{show(h.target)} is not a module target")
            reloc_width(h.type)


def _unique(keys: list, field: str) -> None:
    seen = set()
    for i, k in enumerate(keys):
        if k in seen:
            raise Invalid(f"{field}[{i}]", f"{show(k)} occurs twice")
        seen.add(k)


@dataclass
class Relocation(Record):
    """A relocated field of pre code, [offset, type, kind, name, addend, local] in JSON."""

    POSITIONAL: ClassVar[bool] = True
    offset: int = spec(OFFSET)  # in the function
    type: int = spec(integer(0, 255))  # R_X86_64_*
    # sym: a symbol `name`; sec: a section (not checked: its address is unknown); str: a string
    # literal whose text is `name`
    kind: str = spec(choice("sym", "sec", "str"))
    name: str = spec(string(max_len=65536))
    addend: int = spec(integer(-2**63, 2**63 - 1))
    local: bool = spec(boolean)
    # for a module target's code: the position of `name` among the module's symbols of that name
    # (1-based); 0 for a symbol outside the module, or in vmlinux's code
    sympos: int = spec(integer(0, MAX_LIST))

    @property
    def width(self) -> int:
        return reloc_width(self.type)


@dataclass
class Mask(Record):
    """Bytes the kernel rewrites at run time (fentry, alternatives...): [offset, length, kind]."""

    POSITIONAL: ClassVar[bool] = True
    offset: int = spec(OFFSET)
    length: int = spec(integer(0, 255))
    kind: str = spec(choice(*sorted(SITE_KINDS)))


@dataclass
class PreFunction(Record):
    """A function's pre code, to be compared with the running kernel's."""

    target: str = spec(TARGET_NAME)
    object: str = spec(object_path)
    name: str = spec(SYMBOL)
    size: int = spec(CODE_SIZE)
    local: bool = spec(boolean)
    type: str = spec(string(r"STT_[A-Z0-9_]{1,32}", "an ELF symbol type (STT_FUNC)"))
    code: str = spec(string(max_len=MAX_PRE_BYTES))  # base64
    relocs: list[Relocation] = spec(records(Relocation))
    masks: list[Mask] = spec(records(Mask))
    fentry: int | None = spec(integer(0, MAX_FUNCTION_SIZE, nullable=True))
    section: str = spec(SYMBOL)
    # only a witness: its matching tells which of several same-named symbols the new code means
    referenced_only: bool = spec(boolean)
    # in a module target: the function's position among the module's symbols of its name
    # (1-based); 0 in vmlinux
    sympos: int = spec(integer(0, MAX_LIST))

    @property
    def key(self) -> tuple[str, str]:
        return (self.object, self.name)

    def data(self) -> bytes:
        return base64.b64decode(self.code)

    def validate(self, where: str) -> None:
        try:
            code = base64.b64decode(self.code, validate=True)
        except (ValueError, binascii.Error):
            raise Invalid(f"{where}.code", "not base64") from None
        if len(code) != self.size:
            raise Invalid(f"{where}.code", f"{len(code)} bytes, but size is {self.size}")
        if self.fentry is not None and self.fentry >= self.size:
            raise Invalid(f"{where}.fentry", f"{self.fentry} is outside the function")
        for j, r in enumerate(self.relocs):
            rfield = f"{where}.relocs[{j}]"
            if r.offset + r.width > self.size:
                raise Invalid(f"{rfield}[0] (offset)", f"{r.offset} is outside the function")
            if r.kind == "str":
                if "\0" in r.name or not _latin1(r.name):
                    raise Invalid(f"{rfield}[3] (name)", "not a string literal's text")
            else:
                SYMBOL(r.name, f"{rfield}[3] (name)")
        for j, m in enumerate(self.masks):
            if m.offset >= self.size:
                raise Invalid(f"{where}.masks[{j}][0] (offset)", f"{m.offset} is outside the function")


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
        return True
    except UnicodeEncodeError:
        return False


@dataclass
class PreCode(Record):
    """pre.json."""

    functions: list[PreFunction] = spec(records(PreFunction))  # empty for hooks alone
    # the objects rewritten in place, as the running kernel must hold them (format 6)
    objects: list[PreFunction] = spec(records(PreFunction))

    def validate(self, manifest: Manifest) -> None:
        seen: dict[tuple[str, str], PreFunction] = {}
        targets = {t.name for t in manifest.targets}
        for i, f in enumerate(self.functions):
            where = f"functions[{i}]"
            if f.key in seen:
                raise Invalid(where, f"a second record of {f.object}:{f.name}")
            if f.target not in targets:
                raise Invalid(f"{where}.target", f"{show(f.target)} is not in the manifest's targets")
            seen[f.key] = f
            f.validate(where)
        for i, r in enumerate(manifest.replaced):
            rec = seen.get((r.object, r.name))
            if rec is None or rec.referenced_only:
                raise Missing(f"replaced[{i}]", f"no pre code for {r.object}:{r.name}")
        objects: dict[tuple[str, str], PreFunction] = {}
        for i, o in enumerate(self.objects):
            where = f"objects[{i}]"
            if o.key in objects:
                raise Invalid(where, f"a second record of {o.object}:{o.name}")
            if o.target != VMLINUX:
                raise Invalid(f"{where}.target", "only vmlinux's data is rewritten in place")
            objects[o.key] = o
            o.validate(where)
        for i, w in enumerate(manifest.rewrites):
            rec = objects.get((w.object, w.name))
            if rec is None or rec.size != w.size:
                raise Missing(f"rewrites[{i}]", f"no pre contents of {w.size} bytes for "
                                                f"{w.object}:{w.name}")


class Missing(Invalid):
    """A manifest entry without its pre code (reported as a manifest field)."""


# --- reading ------------------------------------------------------------------------------------

def read_manifest(value: Any, where: str = "package") -> Manifest:
    """The manifest of JSON `value`, every field checked; BadInput naming the first that is not."""
    if not isinstance(value, dict):
        raise BadInput(f"damaged {where}: manifest.json is not a JSON object")
    version = value.get("format")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) \
            and version > FORMAT_VERSION
        raise BadInput(f"{where} has format {show(version)}; this livesplice reads formats "
                       f"{', '.join(map(str, READABLE_VERSIONS))}"
                       + ("; update livesplice to use it" if newer else ""))
    try:
        value = _upgrade(value)
        Manifest.check(value, "")
        manifest = Manifest.from_json(value)
        manifest.validate()
    except Invalid as exc:
        raise BadInput(f"damaged {where}: manifest field {exc.field}: {exc.problem}") from None
    return manifest


def read_pre(value: Any, manifest: Manifest, where: str = "package", member: str = "pre.json",
             version: int = FORMAT_VERSION) -> PreCode:
    """The pre code of JSON `value` (written in format `version`), checked against `manifest`."""
    try:
        if version < FORMAT_VERSION:
            value = _upgrade_pre(value, version)
        PreCode.check(value, "")
        pre = PreCode.from_json(value)
        pre.validate(manifest)
    except Missing as exc:
        raise BadInput(f"damaged {where}: manifest field {exc.field}: {exc.problem} in "
                       f"{member}") from None
    except Invalid as exc:
        raise BadInput(f"damaged {where}: {member} field {exc.field}: {exc.problem}") from None
    return pre


def _upgrade(value: dict) -> dict:
    """An older manifest as format 6 says it."""
    if value.get("format") == 2:
        value = _upgrade_2(value)
    if value.get("format") == 3:
        value = _upgrade_3(value)
    if value.get("format") == 4:
        value = _upgrade_4(value)
    if value.get("format") == 5:
        value = _upgrade_5(value)
    return value


def _upgrade_5(value: dict) -> dict:
    """Format 5 as format 6: nothing rewritten in place, no IBT (the 6.1 kernels), no address
    taken known."""
    if "rewrites" in value:
        raise Invalid("rewrites", "unknown field (in format 5)")
    value = {**value, "format": 6, "rewrites": []}
    if isinstance(value.get("kernel"), dict):
        if "ibt" in value["kernel"]:
            raise Invalid("kernel.ibt", "unknown field (in format 5)")
        value["kernel"] = {**value["kernel"], "ibt": False}
    if isinstance(value.get("kernel_refs"), list):
        for i, e in enumerate(value["kernel_refs"]):
            if isinstance(e, dict) and "address_taken" in e:
                raise Invalid(f"kernel_refs[{i}].address_taken", "unknown field (in format 5)")
        value["kernel_refs"] = [{**e, "address_taken": False} if isinstance(e, dict) else e
                                for e in value["kernel_refs"]]
    return value


def _upgrade_4(value: dict) -> dict:
    """Format 4 as format 5: no hooks."""
    if "hooks" in value:
        raise Invalid("hooks", "unknown field (in format 4)")
    return {**value, "format": 5, "hooks": []}


def _upgrade_3(value: dict) -> dict:
    """Format 3 as format 4: no module code, so no positions and nothing held."""
    if "held" in value:
        raise Invalid("held", "unknown field (in format 3)")
    value = {**value, "format": 4, "held": []}
    if isinstance(value.get("kernel_refs"), list):
        value["kernel_refs"] = [{**e, "sympos": 0} if isinstance(e, dict) and "sympos" not in e
                                else e for e in value["kernel_refs"]]
    return value


def _upgrade_2(value: dict) -> dict:
    """A format 2 manifest as format 3 says it (all of format 2's code was in vmlinux)."""
    for key in ("kernel", "targets"):
        if key in value:
            raise Invalid(key, "unknown field (in format 2)")
    for key in ("replaced", "new", "kernel_refs"):
        for i, e in enumerate(value.get(key) or []):
            if isinstance(e, dict) and "target" in e:
                raise Invalid(f"{key}[{i}].target", "unknown field (in format 2)")
    value = dict(value)
    value["format"] = 3
    if "target" in value:
        kernel = value.pop("target")
        if isinstance(kernel, dict):
            kernel = {"build_id": None, **kernel}
        value["kernel"] = kernel
        value["targets"] = [{"name": VMLINUX, "build_id": kernel.get("build_id")
                             if isinstance(kernel, dict) else None}]
    for key in ("replaced", "new"):
        if isinstance(value.get(key), list):
            value[key] = [{"target": VMLINUX, **e} if isinstance(e, dict) else e
                          for e in value[key]]
    if isinstance(value.get("kernel_refs"), list):
        value["kernel_refs"] = [
            {"target": VMLINUX if e.get("local") else "", **e} if isinstance(e, dict) else e
            for e in value["kernel_refs"]]
    return value


def _upgrade_pre(value: Any, version: int) -> Any:
    """Older pre code as format 6 says it: format 2 had no targets (all vmlinux), 2 and 3 had no
    positions (no module code), 2 to 5 no objects (nothing rewritten in place)."""
    if not isinstance(value, dict) or not isinstance(value.get("functions"), list):
        return value
    if "objects" in value:
        raise Invalid("objects", f"unknown field (in format {version})")
    value = {**value, "objects": []}
    if version >= 4:
        return value
    functions = []
    for f in value["functions"]:
        if isinstance(f, dict):
            f = {**({"target": VMLINUX} if version == 2 else {}), **f}
            if "sympos" not in f:
                f["sympos"] = 0
            if isinstance(f.get("relocs"), list):
                f["relocs"] = [r + [0] if isinstance(r, list) and len(r) == 6 else r
                               for r in f["relocs"]]
        functions.append(f)
    return {**value, "functions": functions}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
