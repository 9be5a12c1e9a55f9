"""Run-pre matching: is the package's pre code what the running kernel runs?

Each pre function is compared with the kernel's memory byte for byte, except where the kernel
rewrites its own code at run time (the masks create recorded from the pre object's own tables:
fentry, alternatives, paravirt, jump labels, static calls, retpoline and return thunks, lock
prefixes) and where relocations were filled in. A relocation's field is not ignored: the address it
holds in memory is worked back to the address of its target symbol, which must agree with
/proc/kallsyms when the name is unique there, with every other use of that symbol, and for string
literals with the text itself. When several functions share a name, the one whose code matches is
the one meant, and the addresses its relocations reveal resolve the new code's references to local
symbols (static variables, static functions) that kallsyms alone cannot tell apart.

A function of a loaded module target is the one at its position (`sympos`, from create) among the
module's symbols of its name, and so is each module symbol its relocations name; a symbol outside
the module is any of that name, vmlinux's or another module's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .coreproto import AppliedUpdate, make_jump
from .elfmodel import ENDBR64, ENDBR_POISON, PC_RELATIVE, R
from .errors import LivespliceError, Refused
from .kernel import Kallsyms, KernelMemory, KSym
from .objdiff import jump_offset
from .pkgformat import VMLINUX, KernelRef, PreFunction, Relocation

SIGNED = {R["R_X86_64_PC32"], R["R_X86_64_PLT32"], R["R_X86_64_32S"], R["R_X86_64_PC64"]}


@dataclass
class FunctionMatch:
    object: str
    name: str
    original: int  # the function's address in vmlinux (where a trampoline goes)
    live: int  # where its current code runs: `original`, or a stacked update's new code
    size: int
    site: int  # where the jump goes
    expect: bytes  # what run-pre matching found there: the code it matched, or the jump stacked on


@dataclass
class ObjectMatch:
    """A read-only object to be rewritten in place, as the running kernel holds it."""

    object: str
    name: str
    address: int
    contents: bytes


@dataclass
class MatchResult:
    functions: dict[tuple[str, str], FunctionMatch] = field(default_factory=dict)
    objects: dict[tuple[str, str], ObjectMatch] = field(default_factory=dict)
    bindings: dict[tuple[str, str], int] = field(default_factory=dict)


def _key(object_: str, name: str, local: bool) -> tuple[str, str]:
    return (object_ if local else "", name)


class Matcher:
    def __init__(self, kallsyms: Kallsyms, memory: KernelMemory, applied: list[AppliedUpdate]):
        self.ks = kallsyms
        self.mem = memory
        # Sites already redirected by an applied update: the code that runs is the jump's target.
        self.redirected = {f.site: f.new_address for u in applied for f in u.funcs if f.site}

    def in_module(self, module: str, name: str, sympos: int) -> KSym | None:
        """The module's `sympos`-th symbol of that name (1-based, in /proc/kallsyms' order)."""
        found = self.ks.lookup(name, module)
        return found[sympos - 1] if 0 < sympos <= len(found) else None

    def reloc_candidates(self, record: PreFunction, reloc: Relocation) -> list[KSym]:
        """The symbols a relocated field of `record` may lead to."""
        if record.target == VMLINUX:
            return self.ks.lookup(reloc.name)
        if reloc.sympos:
            sym = self.in_module(record.target, reloc.name, reloc.sympos)
            return [sym] if sym is not None else [KSym(-1, "?", reloc.name, record.target)]
        return self.ks.symbols(reloc.name)

    def candidates(self, record: PreFunction) -> list[KSym]:
        if record.target == VMLINUX:
            return [s for s in self.ks.lookup(record.name) if s.is_text]
        sym = self.in_module(record.target, record.name, record.sympos)
        return [sym] if sym is not None and sym.is_text else []

    @staticmethod
    def site(original: int, record: PreFunction) -> int:
        return original + jump_offset(record.fentry, record.data()[:8])

    def live_address(self, original: int, record: PreFunction) -> int:
        return self.redirected.get(self.site(original, record), original)

    def expected_at_site(self, original: int, record: PreFunction, memory: bytes) -> bytes:
        site = self.site(original, record)
        if site in self.redirected:
            return make_jump(site, self.redirected[site])
        return memory[site - original:site - original + 5]

    def compare(self, record: PreFunction, live: int, bindings: dict
                ) -> tuple[str | None, dict, bytes]:
        """None if `record` matches the code at `live` (with the bindings it implies), else why;
        and the bytes compared."""
        code = record.data()
        try:
            memory = self.mem.read(live, len(code))
        except Exception as exc:
            return f"cannot read its code: {exc}", {}, b""
        ignore = bytearray(len(code))
        for mask in record.masks:
            ignore[mask.offset:mask.offset + mask.length] = b"\1" * mask.length
            entry = memory[mask.offset:mask.offset + mask.length]
            if mask.kind == "endbr" and entry not in (ENDBR64, ENDBR_POISON):
                return (f"offset {mask.offset:#x}: {entry.hex()} is neither its ENDBR nor a "
                        "sealed one"), {}, b""
        found: dict[tuple[str, str], int] = {}
        for reloc in record.relocs:
            off, rtype, kind, name = reloc.offset, reloc.type, reloc.kind, reloc.name
            width = reloc.width
            masked = any(ignore[off:off + width])
            ignore[off:off + width] = b"\1" * width
            if masked or kind == "sec":
                continue
            value = int.from_bytes(memory[off:off + width], "little", signed=rtype in SIGNED)
            target = value + (live + off if rtype in PC_RELATIVE else 0)
            # 64-bit wrap-around: sign-extended absolute fields (mov $sym, %esi) are negative.
            address = (target - reloc.addend) & 0xFFFFFFFFFFFFFFFF
            if kind == "str":
                text = name.encode("latin-1") + b"\0"
                try:
                    if self.mem.read(address, len(text)) != text:
                        return (f"offset {off:#x}: string literal {name[:40]!r} is not at "
                                f"{address:#x}"), {}, b""
                except (OSError, LivespliceError) as exc:
                    return (f"offset {off:#x}: string literal {name[:40]!r} at {address:#x} "
                            f"is unreadable: {exc}"), {}, b""
                continue
            key = _key(record.object, name, reloc.local)
            known = bindings.get(key, found.get(key))
            if known is not None and known != address:
                return (f"offset {off:#x}: reference to {name} gives {address:#x}, elsewhere "
                        f"{known:#x}"), {}, b""
            candidates = self.reloc_candidates(record, reloc)
            if candidates and address not in {c.address for c in candidates}:
                return (f"offset {off:#x}: reference to {name} gives {address:#x}, which "
                        f"/proc/kallsyms does not have for it"), {}, b""
            found[key] = address
        for i, (a, b) in enumerate(zip(code, memory)):
            if a != b and not ignore[i]:
                return f"byte at offset {i:#x} differs (package {a:#04x}, kernel {b:#04x})", {}, b""
        return None, found, memory

    def match(self, records: list[PreFunction], objects: Sequence[PreFunction] = ()
              ) -> MatchResult:
        """Match the pre code of `records` and the pre contents of `objects` (data rewritten
        in place: compared as code is, relocated fields included, except bytes an
        __ro_after_init object's masks say boot may have written)."""
        result = MatchResult()
        problems = []
        # Functions with a unique name first: their relocations settle local symbols for the rest.
        order = sorted(records, key=lambda r: len(self.ks.lookup(r.name)))
        for record in order:
            what = f"{record.name} ({record.object})"
            candidates = self.candidates(record)
            if not candidates:
                where = "" if record.target == VMLINUX else \
                    f" for module {record.target} (#{record.sympos} of its name)"
                problems.append(f"{what}: not in /proc/kallsyms{where}")
                continue
            matched = []
            reasons = []
            for c in candidates:
                live = self.live_address(c.address, record)
                why, found, memory = self.compare(record, live, result.bindings)
                if why is None:
                    matched.append((c.address, live, found, memory))
                else:
                    reasons.append(f"at {c.address:#x}: {why}")
            if not matched:
                problems.append(f"{what} does not match the running kernel: "
                                + "; ".join(reasons[:3]))
                continue
            if len(matched) > 1 and any(m[2] != matched[0][2] for m in matched[1:]):
                if record.referenced_only:
                    # Only a witness for what the new code uses: it tells nothing, and if the new
                    # code's reference stays unresolved, resolving it says so.
                    continue
                problems.append(f"{what}: {len(matched)} functions of that name match and they "
                                "differ in what they refer to")
                continue
            original, live, found, memory = matched[0]
            if len(matched) > 1 and not record.referenced_only:
                problems.append(f"{what}: {len(matched)} identical functions of that name; cannot "
                                "tell which one the patch changes")
                continue
            result.bindings.update(found)
            result.functions[record.key] = FunctionMatch(
                record.object, record.name, original, live, record.size,
                self.site(original, record), self.expected_at_site(original, record, memory))
            result.bindings[_key(record.object, record.name, record.local)] = original
        for record in objects:
            problem = self._match_object(record, result)
            if problem:
                problems.append(problem)
        if problems:
            raise Refused("run-pre matching failed: the package's pre code is not what this "
                          "kernel runs", problems)
        return result

    def _match_object(self, record: PreFunction, result: MatchResult) -> str | None:
        what = f"data object {record.name} ({record.object})"
        candidates = [s for s in self.ks.lookup(record.name) if not s.is_text]
        if not candidates:
            return f"{what}: not in /proc/kallsyms"
        matched, reasons = [], []
        for c in candidates:
            why, found, memory = self.compare(record, c.address, result.bindings)
            if why is None:
                matched.append((c.address, found, memory))
            else:
                reasons.append(f"at {c.address:#x}: {why}")
        if not matched:
            return f"{what} does not hold what the update expects: " + "; ".join(reasons[:3])
        if len(matched) > 1:
            return (f"{what}: {len(matched)} objects of that name hold the expected contents; "
                    "cannot tell which one the patch changes")
        address, found, memory = matched[0]
        result.bindings.update(found)
        result.bindings[_key(record.object, record.name, record.local)] = address
        result.objects[record.key] = ObjectMatch(record.object, record.name, address, memory)
        return None

    def resolve(self, ref: KernelRef, result: MatchResult) -> int | None:
        """The address of a kernel symbol the new code uses."""
        key = _key(ref.object, ref.name, ref.local)
        if key in result.bindings:
            return result.bindings[key]
        candidates = self.ks.lookup(ref.name)
        if len(candidates) == 1:
            return candidates[0].address
        if not ref.local:
            globals_ = [c for c in candidates if c.is_global]
            if len(globals_) == 1:
                return globals_[0].address
        return None
