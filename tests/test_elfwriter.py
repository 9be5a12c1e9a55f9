"""The new code's object as ElfWriter writes it (what kbuild links into the update module), from
objects compiled here: read back by binutils (`readelf -W -a`, `ld -r`), by pyelftools, and by
livesplice's own reader. No VM."""

import re
import subprocess

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_RELOC_TYPE_x64
from test_objdiff import compile_pair

from livesplice.elfmodel import ObjectFile
from livesplice.newcode import PLACEHOLDER_PREFIX, Extractor, NewCode, section_name

# f: calls a changed static helper and an extern function, prints a string literal, reads a plain
# constant table (copied), a table of pointers and a static counter (both the kernel's, left as
# placeholders), and has a lock prefix recorded in .smp_locks as the kernel's LOCK_PREFIX does.
SOURCE = """
static const int primes[4] = {2, 3, 5, 7};
static const char *const names[2] = {"zero", "one"};
static int counter;
static noinline int helper(int x) { return x * %d + sink; }
int f(int x)
{
    printk("f %%d %%s\\n", x, names[x & 1]);
    asm volatile(".pushsection .smp_locks,\\"a\\"\\n.balign 4\\n.long 671f - .\\n.popsection\\n"
                 "671:\\n\\tlock; incl %%0" : "+m" (counter));
    return helper(x) + primes[x & 3] + %d;
}
"""
TYPE_NAMES = {v: k for k, v in ENUM_RELOC_TYPE_x64.items()}


@pytest.fixture
def written(tmp_path):
    """The post object, the NewCode made from its changed functions, and the object written."""
    diff = compile_pair(tmp_path, SOURCE % (3, 1), SOURCE % (5, 2))
    changed = {c.name for c in diff.changed}
    assert changed == {"f", "helper"}, changed
    post = ObjectFile(tmp_path / "post" / "t.o")
    code = NewCode()
    extractor = Extractor(code, "kernel/t.o", post, diff.names, set(changed))
    for name in sorted(changed):
        extractor.add_function(post.functions[name])
    path = tmp_path / "livesplice_new.o"
    code.writer.write(path)
    return post, code, path


def readelf(path) -> str:
    proc = subprocess.run(["readelf", "-W", "-a", str(path)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


def test_readelf_reads_it_without_complaint(written):
    _, code, path = written
    out = readelf(path)
    assert re.search(r"Type:\s+REL \(Relocatable file\)", out)
    assert re.search(r"Machine:\s+Advanced Micro Devices X86-64", out)
    headers = dict(re.findall(r"^\s*\[\s*\d+\] (\S+)\s+\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+([A-Z]*)\s",
                              out, re.MULTILINE))
    for sec in code.writer.sections:
        flags = ("W" if sec.flags & 1 else "") + ("A" if sec.flags & 2 else "") \
            + ("X" if sec.flags & 4 else "")
        assert headers[sec.name] == flags, sec.name
    for name in ("f", "helper"):
        assert headers[section_name("kernel/t.o", name)] == "AX"
    assert {".smp_locks", "__mcount_loc", ".rodata.livesplice.str", ".rodata.livesplice.primes",
            ".symtab", ".strtab", ".shstrtab"} <= headers.keys()
    counts = dict(re.findall(r"Relocation section '\.rela(\S+)' at offset \S+ contains (\d+) entr",
                             out))
    assert counts == {s.name: str(len(s.relocs)) for s in code.writer.sections if s.relocs}
    symbols = re.findall(r"^\s*\d+: [0-9a-f]{16}\s+\d+ (\w+)\s+(\w+)\s+DEFAULT\s+(\w+) (\S+)$", out,
                         re.MULTILINE)
    by_name = {name: (typ, bind, ndx) for typ, bind, ndx, name in symbols}
    for name in ("f", "helper"):
        assert by_name[name][:2] == ("FUNC", "LOCAL")
    for ref in code.refs.values():
        assert by_name[ref.placeholder] == ("NOTYPE", "GLOBAL", "UND")
    # every relocation names its symbol, as the kernel's module loader will look it up
    placeholders = re.findall(r"^[0-9a-f]{16}\s+[0-9a-f]{16} (R_X86_64_\w+)\s+[0-9a-f]{16} "
                              rf"({PLACEHOLDER_PREFIX}\d+) ([+-]) ", out, re.MULTILINE)
    assert {p for _, p, _ in placeholders} == {r.placeholder for r in code.refs.values()}


def test_binutils_link_it(written, tmp_path):
    # kbuild links it with `ld -r` into the module; ld must take it as it is.
    _, _, path = written
    proc = subprocess.run(["ld", "-r", "-o", str(tmp_path / "linked.o"), str(path)],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_pyelftools_reads_what_was_written(written):
    _, code, path = written
    with open(path, "rb") as f:
        elf = ELFFile(f)
        assert (elf["e_type"], elf["e_machine"]) == ("ET_REL", "EM_X86_64")
        symtab = elf.get_section_by_name(".symtab")
        symbols = list(symtab.iter_symbols())
        # locals first, and sh_info says where the globals start (what readelf and ld rely on)
        binds = [s["st_info"]["bind"] for s in symbols]
        assert binds[:symtab["sh_info"]] == ["STB_LOCAL"] * symtab["sh_info"]
        assert "STB_LOCAL" not in binds[symtab["sh_info"]:]
        for sec in code.writer.sections:
            got = elf.get_section_by_name(sec.name)
            assert got is not None, sec.name
            assert got["sh_flags"] == sec.flags and got["sh_addralign"] == sec.align
            if sec.type == "SHT_NOBITS":
                assert got["sh_size"] == len(sec.data)
            else:
                assert got.data() == bytes(sec.data), sec.name
            rela = elf.get_section_by_name(".rela" + sec.name)
            if not sec.relocs:
                assert rela is None
                continue
            assert elf.get_section(rela["sh_info"]).name == sec.name
            relocs = sorted((r["r_offset"], r["r_info_type"], symbols[r["r_info_sym"]].name,
                             r["r_addend"]) for r in rela.iter_relocations())
            assert relocs == sorted((off, t, sym.name, addend) for off, t, sym, addend in sec.relocs)
        for out in code.writer.symbols:
            sym = symtab.get_symbol_by_name(out.name)
            assert sym is not None and len(sym) == 1, out.name
            sym = sym[0]
            assert (sym["st_info"]["type"], sym["st_info"]["bind"]) == (out.type, out.bind)
            assert (sym["st_value"], sym["st_size"]) == (out.value, out.size)
            if out.section is None:
                assert sym["st_shndx"] == "SHN_UNDEF"
            else:
                assert elf.get_section(sym["st_shndx"]).name == out.section.name


def test_own_reader_sees_the_same_code_and_targets(written, tmp_path):
    """Read back, each function has its post bytes and each relocation the post target: the same
    function, a copy of the same constant or string, or a placeholder for the same kernel symbol."""
    post, code, path = written
    back = ObjectFile(path)
    placeholders = {ref.placeholder: ref.name for ref in code.refs.values()}
    strings = {sym.name: text for text, sym in code.strings.items()}
    assert set(placeholders.values()) == {"sink", "printk", "counter", "names", "__fentry__"}
    for name in ("f", "helper"):
        before, after = post.functions[name], back.functions[name]
        assert after.data == before.data and after.size == before.size
        assert [(r.offset - before.start, r.type) for r in before.relocs] == \
            [(r.offset - after.start, r.type) for r in after.relocs]
        for r_before, r_after in zip(before.relocs, after.relocs):
            want, got = post.target(r_before), back.target(r_after)
            if want.kind == "str":
                assert (strings[got.name], got.offset) == (want.name, want.offset)
            else:
                assert (placeholders.get(got.name, got.name), got.offset) == (want.name, want.offset)
    assert back.data_objects["primes"].data == post.data_objects["primes"].data
    # the lock prefix's entry points at f's own copy, at the same offset in it
    locks = back.section(".smp_locks")
    assert locks is not None and len(locks.relocs) == 1
    entry = locks.relocs[0]
    f = back.functions["f"]
    assert entry.symbol.section is f.section
    assert f.data[entry.symbol.value + entry.addend - f.start] == 0xF0  # lock
    assert TYPE_NAMES[entry.type] == "R_X86_64_PC32"
