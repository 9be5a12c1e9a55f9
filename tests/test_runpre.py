"""Run-pre matching and /proc/kallsyms parsing on what the real stock kernel (6.1.0-53-amd64)
showed once: the pre code a real `create` made for __do_sys_prctl and prctl_set_auxv, and the
kallsyms lines and kernel memory that matching read in the test bed (tests/data/README.md says
how they were recorded). No VM."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import capstone
import pytest

from livesplice.errors import BadInput, LivespliceError, Refused
from livesplice.kernel import Kallsyms
from livesplice.objdiff import jump_offset
from livesplice.pkgformat import (
    FORMAT_VERSION,
    VMLINUX,
    Manifest,
    Mask,
    PreFunction,
    read_manifest,
    read_pre,
)
from livesplice.runpre import Matcher

DATA = Path(__file__).parent / "data" / "prctl"
OBJECT = "kernel/sys.o"


class RecordedMemory:
    """/proc/kcore as run-pre matching saw it in the test bed: the ranges it read, served as
    KernelMemory.read serves them (any other address is unreadable, as an unmapped one is)."""

    def __init__(self, ranges: dict[int, bytes]):
        self.ranges = dict(ranges)

    @classmethod
    def load(cls) -> RecordedMemory:
        recorded = json.loads((DATA / "kcore.json").read_text())["ranges"]
        return cls({int(r["address"], 16): base64.b64decode(r["bytes"]) for r in recorded})

    def read(self, address: int, size: int) -> bytes:
        for start, data in self.ranges.items():
            if start <= address and address + size <= start + len(data):
                return data[address - start:address - start + size]
        raise LivespliceError(f"kernel address {address:#x}+{size} is not readable in /proc/kcore")

    def changed(self, address: int, new: bytes) -> RecordedMemory:
        """A copy with the bytes at `address` replaced."""
        for start, data in self.ranges.items():
            if start <= address and address + len(new) <= start + len(data):
                at = address - start
                return RecordedMemory({**self.ranges, start: data[:at] + new + data[at + len(new):]})
        raise AssertionError(f"{address:#x} was not recorded")

    def without(self, address: int) -> RecordedMemory:
        return RecordedMemory({a: d for a, d in self.ranges.items() if a != address})


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return read_manifest(json.loads((DATA / "manifest.json").read_text()))


@pytest.fixture(scope="module")
def records(manifest) -> list[PreFunction]:
    return read_pre(json.loads((DATA / "pre.json").read_text()), manifest).functions


@pytest.fixture(scope="module")
def kallsyms_text() -> str:
    return (DATA / "kallsyms").read_text()


@pytest.fixture(scope="module")
def kallsyms(kallsyms_text) -> Kallsyms:
    return Kallsyms(kallsyms_text)


@pytest.fixture(scope="module")
def recorded() -> dict:
    """What matching found in the test bed when the data was recorded."""
    return json.loads((DATA / "matched.json").read_text())


def record(records: list[PreFunction], name: str) -> PreFunction:
    return next(r for r in records if r.name == name)


def match(kallsyms, memory, records):
    return Matcher(kallsyms, memory, []).match(records)  # type: ignore[arg-type]


def not_matching(name: str, address: int, why: str) -> str:
    """Run-pre matching's reason when the code of `name` at `address` is not the pre code."""
    return f"{name} ({OBJECT}) does not match the running kernel: at {address:#x}: {why}"


def refusal(kallsyms, memory, records) -> list[str]:
    with pytest.raises(Refused) as caught:
        match(kallsyms, memory, records)
    assert "the package's pre code is not what this kernel runs" in str(caught.value)
    return caught.value.reasons


def test_recorded_package_is_create_output_for_the_recorded_kernel(manifest, records, recorded):
    assert manifest.format == FORMAT_VERSION  # recorded again when the format changes
    assert manifest.kernel.build_id == recorded["kernel"]["build_id"]
    assert manifest.kernel.release == recorded["kernel"]["release"] == "6.1.0-53-amd64"
    assert [(r.target, r.name) for r in manifest.replaced] == [
        (VMLINUX, "__do_sys_prctl"), (VMLINUX, "prctl_set_auxv")]
    # and the witnesses create added for the static functions __do_sys_prctl calls
    assert {r.name for r in records if r.referenced_only} == {
        "prctl_set_mm", "propagate_has_child_subreaper"}


def test_kallsyms_lines_parse(kallsyms, kallsyms_text):
    lines = [line.split() for line in kallsyms_text.splitlines()]
    assert lines and all(len(parts) == 3 for parts in lines)
    for address, type_, name in lines:
        (sym,) = kallsyms.lookup(name)
        assert (sym.address, sym.type, sym.module) == (int(address, 16), type_, None)
        assert sym.is_text == (type_ in "tTwW") and sym.is_global == type_.isupper()
        assert kallsyms.address(name) == sym.address
    assert not kallsyms.lookup("current_task")[0].is_text  # per-CPU ("A"), not code
    assert kallsyms.lookup("memcpy")[0].is_text  # weak ("W") code
    # the text symbol after a function: where the next one starts
    texts = sorted(int(a, 16) for a, t, _ in lines if t in "tTwW")
    auxv = kallsyms.address("prctl_set_auxv")
    assert kallsyms.next_text_after(auxv) == texts[texts.index(auxv) + 1]
    assert kallsyms.next_text_after(texts[-1]) is None
    with pytest.raises(LivespliceError, match="no_such_function: 0 symbols"):
        kallsyms.address("no_such_function")


def test_kallsyms_module_symbols_are_kept_apart(kallsyms_text):
    # A module's symbol of the same name (as /proc/kallsyms lists it: "[module]" last) is not
    # vmlinux's.
    line = next(ln for ln in kallsyms_text.splitlines() if ln.endswith(" prctl_set_auxv"))
    module_line = "ffffffffc0a01000 t prctl_set_auxv\t[livesplice_recorded]"
    both = Kallsyms(kallsyms_text + module_line + "\n")
    assert [s.address for s in both.lookup("prctl_set_auxv")] == [int(line.split()[0], 16)]
    assert [s.address for s in both.lookup("prctl_set_auxv", "livesplice_recorded")] == [0xffffffffc0a01000]


def test_kallsyms_without_addresses_is_refused(kallsyms_text):
    # What a user who is not root reads (kptr_restrict): every address zero.
    hidden = "".join("0" * 16 + line[16:] + "\n" for line in kallsyms_text.splitlines())
    with pytest.raises(BadInput, match="shows no addresses: run as root"):
        Kallsyms(hidden)


def test_pre_code_matches_the_recorded_kernel(kallsyms, records, recorded):
    memory = RecordedMemory.load()
    result = match(kallsyms, memory, records)
    assert set(result.functions) == {r.key for r in records}
    for r in records:
        found = result.functions[r.key]
        assert found.original == found.live == kallsyms.address(r.name)
        assert found.size == r.size
        # the jump goes after the fentry call (a traceable function) or at the entry (notrace)
        assert found.site == found.original + jump_offset(r.fentry, r.data())
        assert found.expect == memory.read(found.site, 5)
    assert result.functions[(OBJECT, "__do_sys_prctl")].site == kallsyms.address("__do_sys_prctl")
    assert result.functions[(OBJECT, "prctl_set_auxv")].site == kallsyms.address("prctl_set_auxv") + 5
    # the same as in the test bed
    assert [(f.name, f.original, f.site, f.expect.hex()) for f in result.functions.values()] == [
        (f["name"], int(f["original"], 16), int(f["site"], 16), f["expect"])
        for f in recorded["functions"]]


def test_bindings_are_the_kallsyms_addresses(kallsyms, records, manifest, recorded):
    matcher = Matcher(kallsyms, RecordedMemory.load(), [])  # type: ignore[arg-type]
    result = matcher.match(records)
    referenced = {(OBJECT if reloc.local else "", reloc.name) for r in records for reloc in r.relocs
                  if reloc.kind == "sym" and not masked(r, reloc.offset)}
    # every symbol the pre code refers to (where the kernel does not rewrite the code: the
    # fentry call and return thunks) is bound, and where kallsyms has it
    assert referenced <= set(result.bindings)
    for (_, name), address in result.bindings.items():
        assert address in {s.address for s in kallsyms.lookup(name)}, name
    # the static functions are bound for kernel/sys.o (the new code's local references)
    assert result.bindings[(OBJECT, "prctl_set_mm")] == kallsyms.address("prctl_set_mm")
    assert result.bindings[(OBJECT, "validate_prctl_map_addr")] == \
        kallsyms.address("validate_prctl_map_addr")
    assert result.bindings[("", "current_task")] == kallsyms.address("current_task")  # per-CPU
    assert {(b["object"], b["name"]): int(b["address"], 16) for b in recorded["bindings"]} == \
        result.bindings
    # the new code's every reference resolves, to the kallsyms address
    for ref in manifest.kernel_refs:
        address = matcher.resolve(ref, result)
        assert address == kallsyms.address(ref.name), ref
        assert recorded["resolved"][ref.placeholder] == f"{address:#x}"


def test_call_targets_agree_with_the_disassembly(kallsyms, records):
    """Independently of the matcher: capstone decodes each call in the recorded code, and its
    target is where the matcher bound the symbol the relocation names."""
    memory = RecordedMemory.load()
    result = match(kallsyms, memory, records)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    checked = 0
    for r in records:
        start = kallsyms.address(r.name)
        by_offset = {reloc.offset: reloc for reloc in r.relocs if reloc.kind == "sym"}
        for insn in md.disasm(memory.read(start, r.size), start):
            field = insn.address + insn.size - 4 - start
            if insn.mnemonic != "call" or field not in by_offset:
                continue  # a call the kernel turned into a nop (fentry), or a register call
            reloc = by_offset[field]
            key = (OBJECT if reloc.local else "", reloc.name)
            assert int(insn.op_str, 16) == result.bindings[key], reloc
            checked += 1
    assert checked >= 30


def masked(rec: PreFunction, offset: int) -> bool:
    """Whether the kernel rewrites the byte at `offset` of `rec`'s code by itself."""
    return any(m.offset <= offset < m.offset + m.length for m in rec.masks)


def first_plain_byte(rec: PreFunction, start: int = 0x10) -> int:
    """An offset of `rec`'s code that no mask and no relocation covers."""
    relocated = {i for r in rec.relocs for i in range(r.offset, r.offset + r.width)}
    return next(i for i in range(start, rec.size) if not masked(rec, i) and i not in relocated)


def test_a_changed_byte_is_a_mismatch(kallsyms, records):
    rec = record(records, "__do_sys_prctl")
    address = kallsyms.address("__do_sys_prctl")
    memory = RecordedMemory.load()
    offset = first_plain_byte(rec)
    package = rec.data()[offset]
    assert memory.read(address + offset, 1)[0] == package
    changed = memory.changed(address + offset, bytes([package ^ 0x40]))
    why = f"byte at offset {offset:#x} differs (package {package:#04x}, kernel {package ^ 0x40:#04x})"
    assert refusal(kallsyms, changed, records) == [not_matching("__do_sys_prctl", address, why)]


def test_sites_the_kernel_rewrites_may_differ(kallsyms, records):
    # A jump label switched on (its nop now a jmp) and ftrace tracing prctl_set_auxv (its fentry
    # nop now a call): the code still matches.
    memory = RecordedMemory.load()
    prctl, auxv = record(records, "__do_sys_prctl"), record(records, "prctl_set_auxv")
    label = next(m.offset for m in prctl.masks if m.kind == "jump label")
    memory = memory.changed(kallsyms.address("__do_sys_prctl") + label, bytes.fromhex("e912345678"))
    assert auxv.fentry == 0
    memory = memory.changed(kallsyms.address("prctl_set_auxv"), bytes.fromhex("e8aabbccdd"))
    assert (OBJECT, "__do_sys_prctl") in match(kallsyms, memory, records).functions


def test_a_call_to_elsewhere_is_a_mismatch(kallsyms, records):
    rec = record(records, "__do_sys_prctl")
    address = kallsyms.address("__do_sys_prctl")
    off = next(r.offset for r in rec.relocs if r.name == "security_task_prctl")
    memory = RecordedMemory.load()
    rel32 = int.from_bytes(memory.read(address + off, 4), "little", signed=True)
    changed = memory.changed(address + off, (rel32 + 0x10).to_bytes(4, "little", signed=True))
    target = kallsyms.address("security_task_prctl") + 0x10
    why = (f"offset {off:#x}: reference to security_task_prctl gives {target:#x}, which "
           "/proc/kallsyms does not have for it")
    assert refusal(kallsyms, changed, records) == [not_matching("__do_sys_prctl", address, why)]


def test_two_uses_of_one_symbol_must_agree(kallsyms, records):
    # current_task's second use in __do_sys_prctl points 8 bytes further than its first.
    rec = record(records, "__do_sys_prctl")
    address = kallsyms.address("__do_sys_prctl")
    uses = [r.offset for r in rec.relocs if r.name == "current_task"]
    second = uses[1]
    memory = RecordedMemory.load()
    value = int.from_bytes(memory.read(address + second, 4), "little", signed=True)
    changed = memory.changed(address + second, (value + 8).to_bytes(4, "little", signed=True))
    current_task = kallsyms.address("current_task")
    why = (f"offset {second:#x}: reference to current_task gives {current_task + 8:#x}, "
           f"elsewhere {current_task:#x}")
    assert refusal(kallsyms, changed, records) == [not_matching("__do_sys_prctl", address, why)]


def unreadable(address: int, size: int) -> str:
    return f"cannot read its code: kernel address {address:#x}+{size} is not readable in /proc/kcore"


def test_unreadable_code_and_missing_symbols(kallsyms, kallsyms_text, records):
    auxv = kallsyms.address("prctl_set_auxv")
    why = unreadable(auxv, record(records, "prctl_set_auxv").size)
    assert refusal(kallsyms, RecordedMemory.load().without(auxv), records) == [
        not_matching("prctl_set_auxv", auxv, why)]
    without = Kallsyms("".join(line + "\n" for line in kallsyms_text.splitlines()
                               if not line.endswith(" prctl_set_auxv")))
    assert refusal(without, RecordedMemory.load(), records) == [
        "prctl_set_auxv (kernel/sys.o): not in /proc/kallsyms"]


def test_the_function_whose_code_matches_is_the_one_meant(kallsyms_text, records):
    # A second prctl_set_auxv in kallsyms, at code that is not it (prctl_set_mm's): matching
    # keeps the one that matches, and says why not the other when neither does.
    ks = Kallsyms(kallsyms_text)
    real, other = ks.address("prctl_set_auxv"), ks.address("prctl_set_mm")
    twice = Kallsyms(kallsyms_text + f"{other:016x} t prctl_set_auxv\n")
    assert len(twice.lookup("prctl_set_auxv")) == 2
    memory = RecordedMemory.load()
    assert match(twice, memory, records).functions[(OBJECT, "prctl_set_auxv")].original == real
    reasons = refusal(twice, memory.without(real), records)
    assert len(reasons) == 1
    why = unreadable(real, record(records, "prctl_set_auxv").size)
    assert reasons[0].startswith(not_matching("prctl_set_auxv", real, why) + f"; at {other:#x}: ")


def endbr_function(entry: bytes) -> tuple[Kallsyms, RecordedMemory, PreFunction]:
    """A notrace function of an IBT kernel: ENDBR, then code; its running entry is `entry`."""
    code = bytes.fromhex("f30f1efa") + bytes.fromhex("31c0c3") + bytes(9)
    record = PreFunction(VMLINUX, "kernel/x.o", "ibt_fn", len(code), False, "STT_FUNC",
                         base64.b64encode(code).decode(), [], [Mask(0, 4, "endbr")], None,
                         ".text.ibt_fn", False, 0)
    ks = Kallsyms("ffffffff81000000 T _stext\nffffffff81001000 T ibt_fn\n")
    return ks, RecordedMemory({0xFFFFFFFF81001000: entry + code[4:]}), record


@pytest.mark.parametrize("entry", ["f30f1efa", "660f1f00"])
def test_an_endbr_matches_kept_or_sealed(entry):
    ks, memory, record = endbr_function(bytes.fromhex(entry))
    found = Matcher(ks, memory, []).match([record]).functions[record.key]
    assert found.site == 0xFFFFFFFF81001004  # after the ENDBR, never over it


def test_an_endbr_matches_nothing_else():
    ks, memory, record = endbr_function(bytes.fromhex("0f1f4000"))
    with pytest.raises(Refused) as caught:
        Matcher(ks, memory, []).match([record])
    assert "0f1f4000 is neither its ENDBR nor a sealed one" in caught.value.reasons[0]
