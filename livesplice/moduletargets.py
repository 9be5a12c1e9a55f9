"""create's module stage: tie the update's module code to the compiled modules it targets.

For each module the patch changes code in (a *module target*), the compiled module of the
target kernel (the stock `.ko`, `stockmodule.ModuleImage`) gives the module's build id and the
position (`sympos`) of each symbol the update names in it: of each replaced function (decided by
comparing code, as run-pre matching does), of each static the pre code's relocations lead to,
and of each symbol the new code uses. A global the new code uses is the module's own, another
module's (exported, per the kernel's Module.symvers) or vmlinux's.

The new code's fields that refer into a module cannot be linked when the update's module loads:
the target may not be loaded yet, and may load again at another address. They are *held*: their
relocations become R_X86_64_NONE in the update's module, and the manifest lists them; the core
writes them each time it patches that target (docs/module-targets.md).
"""

from __future__ import annotations

import struct
from pathlib import Path

from .debian import module_file
from .elfmodel import SHT
from .errors import BadInput, Refused
from .includes import module_name
from .kernel import ELF64_RELA, ELF64_SECTION, ELF64_SYM
from .newcode import TABLES, NewCode
from .pkgformat import PLACEHOLDER_PREFIX, VMLINUX, HeldField, KernelRef, PreFunction
from .stockmodule import ModuleImage

R_X86_64_NONE = 0


def module_files(modules_dir: Path, paths: dict[str, str]) -> dict[str, Path]:
    """Module name -> its compiled file under `modules_dir` (/lib/modules/RELEASE), from
    kbuild's path for it (drivers/block/zram/zram -> kernel/drivers/block/zram/zram.ko, or .ko.xz
    where the kernel compresses its modules, as the 6.12 line does)."""
    out = {}
    for name, path in paths.items():
        ko = module_file(modules_dir, f"kernel/{path}") or modules_dir / "kernel" / f"{path}.ko"
        if not ko.is_file():
            raise BadInput(f"the patch changes code of module {name}, but the target kernel's "
                           f"compiled module is not at {ko}: livesplice needs it to find the "
                           "module's symbols (install the kernel's modules, or use a stock kernel)")
        out[name] = ko
    return out


def exporters(symvers: Path) -> dict[str, str]:
    """Exported symbol -> the module that exports it ("" for vmlinux), from Module.symvers."""
    out: dict[str, str] = {}
    try:
        text = symvers.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out[parts[1]] = "" if parts[2] == "vmlinux" else module_name(parts[2])
    return out


def place_in_modules(pre_code: list[PreFunction], code: NewCode, images: dict[str, ModuleImage],
                     exported: dict[str, str]) -> None:
    """Give every pre function, relocation and kernel reference of a module target its position
    in its module; Refused if the target's compiled module is not what the pre code was built
    as, or a symbol the new code needs cannot be told apart."""
    problems = []
    bindings: dict[tuple[str, str], int] = {}  # (object, name) -> sympos, from matched code
    for record in sorted(pre_code, key=lambda r: r.referenced_only):
        if record.target == VMLINUX:
            continue
        image = images[record.target]
        located = image.locate(record)
        if isinstance(located, str):
            if not record.referenced_only:
                problems.append(f"{located}: the source or config is not the one module "
                                f"{record.target} was built from")
            continue
        record.sympos = located.sympos
        if located.by_name:
            code.notes.append(f"{record.object}: {record.name}'s code is not module "
                              f"{record.target}'s stock code (stacked on another update, or "
                              "another build): found by its name; apply checks the running code")
        for reloc in record.relocs:
            if reloc.kind == "sym":
                reloc.sympos = located.bindings.get(reloc.name, 0)
        bindings[(record.object, record.name)] = located.sympos
        for name, pos in located.bindings.items():
            if pos and not located.by_name:
                bindings.setdefault((record.object, name), pos)
    for ref in code.refs.values():
        if not ref.target or ref.target == VMLINUX:
            continue
        image = images[ref.target]
        if ref.local:
            found = bindings.get((ref.object, ref.name))
            named = image.named(ref.name)
            if found is None and len(named) == 1:
                found = named[0].sympos
            if found is None:
                problems.append(f"{ref.name} ({ref.object}): {len(named)} symbols of that name in "
                                f"module {ref.target}, and no matched code tells which one the "
                                "new code means")
                continue
            ref.sympos = found
        elif image.defines(ref.name):
            ref.sympos = image.named(ref.name)[0].sympos
        else:
            # Not the module's own: another module's export (found by name when the target is
            # patched: the target depends on it, so it is loaded then), or vmlinux's.
            ref.target, ref.sympos = exported.get(ref.name, ""), 0
    if problems:
        raise Refused("the update's module code does not match the target kernel's modules",
                      problems)


def hold_module_fields(ko: bytes, code: NewCode, refs: list[KernelRef]) -> tuple[bytes, list[HeldField]]:
    """The update's module with the relocations that refer into a module made R_X86_64_NONE,
    and those fields, for the core to write when it patches their target."""
    into_module = {r.placeholder: r for r in refs if r.target not in ("", VMLINUX)}
    if not into_module:
        return ko, []
    out = bytearray(ko)
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
    sections = [ELF64_SECTION.unpack_from(ko, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx]

    def name_of(entry: tuple) -> str:
        start = names[4] + entry[0]
        return ko[start:ko.index(b"\0", start)].decode()

    held, problems = [], []
    for entry in sections:
        if entry[1] != SHT["SHT_RELA"]:
            continue
        _, _, _, _, offset, size, link, info, _, entsize = entry
        symtab = sections[link]
        strtab = sections[symtab[6]]
        target_section = name_of(sections[info])
        for at in range(offset, offset + size, entsize):
            r_offset, r_info, r_addend = ELF64_RELA.unpack_from(ko, at)
            st_name = ELF64_SYM.unpack_from(ko, symtab[4] + (r_info >> 32) * ELF64_SYM.size)[0]
            start = strtab[4] + st_name
            name = ko[start:ko.index(b"\0", start)].decode()
            if not name.startswith(PLACEHOLDER_PREFIX) or name not in into_module:
                continue
            ref = into_module[name]
            owners = code.section_targets.get(target_section, set())
            if target_section in TABLES or target_section.startswith(".rela") or len(owners) != 1:
                problems.append(f"{ref.name} of module {ref.target} is used by the new code's "
                                f"{target_section}, which the module loader reads when it loads "
                                "the update: it cannot wait for the module")
                continue
            held.append(HeldField(next(iter(owners)), target_section, r_offset, r_info & 0xFFFFFFFF,
                                  name, r_addend))
            struct.pack_into("<Q", out, at + 8, r_info & ~0xFFFFFFFF | R_X86_64_NONE)
    if problems:
        raise Refused("the new code cannot be linked to its module targets", sorted(set(problems)))
    return bytes(out), held
