"""Kallsyms lookups and linking a module against the kernel's symbols, on an excerpt of a real
/proc/kallsyms of the stock kernel (tests/data/README.md says how it was recorded): no VM."""

from __future__ import annotations

import io
import re
from collections import defaultdict
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from livesplice.elfmodel import ElfWriter, OutSection, OutSymbol, R
from livesplice.errors import BadInput, LivespliceError, Refused
from livesplice.kernel import SHN_ABS, Kallsyms, link_unexported, undefined_symbols

DATA = Path(__file__).parent / "data" / "kallsyms-6.1.0-53-amd64.txt"
Row = tuple[int, str, str, str | None]  # address, type, name, module


@pytest.fixture(scope="module")
def text() -> str:
    return DATA.read_text()


@pytest.fixture(scope="module")
def rows(text) -> list[Row]:
    """Each line parsed on its own, the plain way: what every lookup must agree with."""
    out = []
    for line in text.splitlines():
        head, _, module = line.partition("\t")
        address, type_, name = head.split()
        out.append((int(address, 16), type_, name, module.removeprefix("[").removesuffix("]") or None))
    return out


@pytest.fixture(scope="module")
def ks(text) -> Kallsyms:
    return Kallsyms(text)


def as_rows(symbols) -> list[Row]:
    return [(s.address, s.type, s.name, s.module) for s in symbols]


def test_every_name_as_a_plain_parse_finds_it(ks, rows):
    by_name: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_name[row[2]].append(row)
    assert len(by_name) > 1000
    for name, expected in by_name.items():
        assert as_rows(ks.symbols(name)) == expected, name
        for module in {row[3] for row in expected}:
            assert as_rows(ks.lookup(name, module)) == [r for r in expected if r[3] == module]


def test_bytes_and_text_give_the_same_answers(text, ks):
    from_bytes = Kallsyms(text.encode())
    for name in ("__do_sys_prctl", "modalias_show", "cleanup_module", "_stext"):
        assert from_bytes.symbols(name) == ks.symbols(name)


def test_static_functions_of_one_name(ks, rows):
    shows = ks.lookup("modalias_show")  # vmlinux's: one per driver core file that has one
    assert len(shows) >= 5 and len({s.address for s in shows}) == len(shows)
    assert all(s.type == "t" and not s.is_global and s.is_text for s in shows)
    with pytest.raises(LivespliceError, match=f"modalias_show: {len(shows)} symbols"):
        ks.address("modalias_show")
    prctl = [r for r in rows if r[2] == "__do_sys_prctl"]
    assert len(prctl) == 1 and ks.address("__do_sys_prctl") == prctl[0][0]


def test_module_symbols_are_looked_up_by_module(ks):
    assert ks.lookup("cleanup_module") == []  # vmlinux has none
    modules = [s.module for s in ks.symbols("cleanup_module")]
    assert {"virtio_console", "9pnet_virtio", "virtio"} <= set(modules)
    assert len(modules) == len(set(modules))
    (console,) = ks.lookup("cleanup_module", "virtio_console")
    assert console.module == "virtio_console" and console.is_text
    # A name both vmlinux and a module have: each lookup sees only its own.
    vmlinux = ks.lookup("modalias_show")
    module = ks.lookup("modalias_show", "virtio")
    assert vmlinux and len(module) == 1 and module[0] not in vmlinux


@pytest.mark.parametrize("name", [
    "__do_sys_prct",  # a prefix of a name
    "do_sys_prctl",  # a suffix of one
    "9pnet_virtio",  # a module's name, not a symbol's
    "__do_sys_prctl\nffffffff81000000 T x",  # white space: no kallsyms name has any
    "__do_sys_prctl ",
    "",
    "nonexistent_symbol_livesplice",
    "sym\u00e9",
])
def test_names_the_kernel_does_not_have(ks, name):
    assert ks.symbols(name) == [] and ks.lookup(name) == []


def test_next_text_after(ks, rows):
    text_addresses = sorted({r[0] for r in rows if r[1] in "tTwW"})

    def brute_force(address: int) -> int | None:
        return next((a for a in text_addresses if a > address), None)

    # __do_sys_prctl ends where __x64_sys_prctl begins, the next text symbol in address order.
    assert ks.next_text_after(ks.address("__do_sys_prctl")) == ks.address("__x64_sys_prctl")
    probes = {0, 2**64 - 1, text_addresses[-1]}
    for r in rows:
        probes |= {r[0] - 1, r[0], r[0] + 1}
    for address in sorted(probes):
        assert ks.next_text_after(address) == brute_force(address), hex(address)


def test_exported(ks, rows):
    exported = {r[2].removeprefix("__ksymtab_") for r in rows if r[2].startswith("__ksymtab_")}
    assert len(exported) > 100
    assert all(ks.exported(name) for name in exported)
    assert not ks.exported("__do_sys_prctl") and not ks.exported("__x64_sys_prctl")
    assert not ks.exported("__ksymtab___flush_workqueue") and ks.exported("__flush_workqueue")
    assert not ks.exported("")


def test_kernel_showing_no_addresses_is_bad_input(text):
    hidden = re.sub(r"^[0-9a-f]{16}", "0" * 16, text, flags=re.MULTILINE)  # kptr_restrict
    with pytest.raises(BadInput, match="no addresses"):
        Kallsyms(hidden)


@pytest.fixture
def build_module(tmp_path):
    def build(names: list[str]) -> bytes:
        writer = ElfWriter()
        code = bytearray(b"\xe8\0\0\0\0" * len(names) + b"\xc3")
        text = writer.add_section(OutSection(".text", code, flags=0x6))
        writer.add_symbol(OutSymbol("caller", text, 0, len(code), "STT_FUNC"))
        for i, name in enumerate(names):
            text.relocs.append((5 * i + 1, R["R_X86_64_PLT32"],
                                writer.add_symbol(OutSymbol(name, None)), -4))
        path = tmp_path / "m.o"
        writer.write(path)
        return path.read_bytes()
    return build


def symbols_by_name(ko: bytes) -> dict:
    symtab = ELFFile(io.BytesIO(ko)).get_section_by_name(".symtab")
    return {s.name: s for s in symtab.iter_symbols() if s.name}


def test_undefined_symbols_as_pyelftools_reads_them(build_module):
    names = ["__flush_workqueue", "__x64_sys_prctl", "__livesplice_sym_0", "modalias_show"]
    ko = build_module(names)
    symtab = ELFFile(io.BytesIO(ko)).get_section_by_name(".symtab")
    expected = [(symtab["sh_offset"] + i * symtab["sh_entsize"], s.name)
                for i, s in enumerate(symtab.iter_symbols())
                if s.name and s["st_shndx"] == "SHN_UNDEF"]
    assert undefined_symbols(ko) == expected and sorted(n for _, n in expected) == sorted(names)


def test_link_unexported(ks, build_module):
    ko = build_module(["__flush_workqueue", "__x64_sys_prctl", "__livesplice_sym_0"])
    linked = link_unexported(ko, ks, {"__livesplice_sym_0": 0xFFFFFFFFC0001234})
    assert len(linked) == len(ko)
    syms = symbols_by_name(linked)
    # Exported: left to the module loader (and its version checks).
    assert syms["__flush_workqueue"]["st_shndx"] == "SHN_UNDEF"
    # Unexported: made absolute at its vmlinux address; given names at the address given.
    assert syms["__x64_sys_prctl"]["st_shndx"] == "SHN_ABS"
    assert syms["__x64_sys_prctl"]["st_value"] == ks.address("__x64_sys_prctl")
    assert syms["__livesplice_sym_0"]["st_shndx"] == "SHN_ABS"
    assert syms["__livesplice_sym_0"]["st_value"] == 0xFFFFFFFFC0001234
    assert SHN_ABS == 0xFFF1
    # Nothing else changed.
    changed = [i for i, (a, b) in enumerate(zip(ko, linked)) if a != b]
    entries = {at for at, name in undefined_symbols(ko) if name != "__flush_workqueue"}
    assert changed and all(any(at + 6 <= i < at + 16 for at in entries) for i in changed)


def test_link_unexported_names_what_it_cannot_resolve(ks, build_module):
    ko = build_module(["modalias_show", "nonexistent_symbol_livesplice", "__x64_sys_prctl"])
    with pytest.raises(Refused, match="not exactly once: modalias_show, "
                                      "nonexistent_symbol_livesplice$"):
        link_unexported(ko, ks)


@pytest.mark.parametrize("damage", [
    lambda ko: b"",
    lambda ko: b"\x7fELF",
    lambda ko: ko[:64],  # the section headers cut off
    lambda ko: ko[:4] + b"\x01" + ko[5:],  # 32-bit
    lambda ko: ko[:0x28] + (len(ko) + 64).to_bytes(8, "little") + ko[0x30:],  # headers beyond
])
def test_damaged_module_is_bad_input(build_module, damage):
    with pytest.raises(BadInput, match="modules/x.ko is not a valid x86-64 kernel module"):
        undefined_symbols(damage(build_module(["a"])), "modules/x.ko")
