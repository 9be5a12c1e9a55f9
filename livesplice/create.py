"""`create`: from a source tree, its config and a patch, an update package.

Phase 1 builds the pre and post objects the patch touches (build), phase 2 finds the functions whose
code changed and what cannot change live (objdiff, layout), phase 3 turns the new code into a
module (newcode), phase 4 bundles it with the pre code run-pre matching needs (package).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import debian
from .build import WorkTree, build_pre_post, config_hash, console, kernel_release, patch_files
from .elfmodel import Item, ObjectFile, fentry_offset, runtime_patched_sites
from .errors import BadInput, NothingToDo, Refused
from .layout import layout_changes
from .newcode import (Extractor, NewCode, build_core, build_module, callbacks, check_problems,
                      section_name)
from .objdiff import ObjectDiff, diff_objects, section_kind
from .package import Package
from . import pkgformat
from .pkgformat import (FORMAT_VERSION, VMLINUX, KernelIdentity, Manifest, Mask, ModuleFile,
                        NewFunction, PatchedObject, PreCode, PreFunction, Relocation,
                        ReplacedFunction, Source)

KBUILD_FILES = re.compile(r"(^|/)(Kconfig[^/]*|Makefile[^/]*|Kbuild[^/]*)$")


@dataclass
class Target:
    release: str
    version: str | None  # the image's version banner (release (builder) #N ...), if known
    headers: Path
    stock: str | None = None
    # The GNU build id of the target's vmlinux, its identity for apply's check (None: unknown,
    # `build_id_note` says why; apply then falls back to the release and version banner).
    build_id: str | None = None
    build_id_note: str | None = None


@dataclass
class CreateResult:
    package: Package
    path: Path
    diffs: list[ObjectDiff]
    timings: dict[str, float] = field(default_factory=dict)


def find_target(tree: WorkTree, target_abi: str | None) -> Target:
    """The kernel the update is for: a stock kernel named or recognised by its config."""
    if target_abi is None:
        own = config_hash(tree.config_path)
        for abi in debian.KNOWN_KERNELS:
            files = debian.kernel_files(abi)
            if files.config.exists() and config_hash(files.config) == own:
                target_abi = abi
                break
    if target_abi is not None:
        files = debian.kernel_files(target_abi)
        if not (files.root / ".complete").exists() or not files.headers.exists():
            files = debian.fetch_kernel(target_abi, with_source=False)
        return Target(target_abi, debian.image_version(files.vmlinuz), files.headers, target_abi,
                      debian.image_build_id(files))
    release = kernel_release(tree.src, tree.config)
    headers = Path(f"/lib/modules/{release}/build")
    if not headers.exists():
        raise BadInput(f"no headers for kernel {release} at {headers}: pass --target with a "
                       "stock kernel, or install that kernel's headers")
    build_id, note = tree_build_id(tree.source / "vmlinux", release)
    return Target(release, None, headers, None, build_id, note)


def tree_build_id(vmlinux: Path, release: str) -> tuple[str | None, str | None]:
    """The build id of a self-built kernel, from the vmlinux in its tree if that is a build of
    `release`; otherwise none, and why."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    from .buildid import NoteError, elf_build_id

    fallback = "apply will identify the kernel by its release only"
    if not vmlinux.is_file():
        return None, f"no build id recorded: no {vmlinux}; {fallback}"
    try:
        with open(vmlinux, "rb") as f:
            rodata = ELFFile(f).get_section_by_name(".rodata")
            banner = rodata is not None and \
                f"Linux version {release} (".encode() in rodata.data()
        if not banner:
            return None, (f"no build id recorded: {vmlinux} is not a build of {release} (its "
                          f"banner says otherwise); {fallback}")
        build_id = elf_build_id(vmlinux)
    except (NoteError, OSError, ELFError) as exc:
        return None, f"no build id recorded: {vmlinux} cannot be read ({exc}); {fallback}"
    if build_id is None:
        return None, f"no build id recorded: {vmlinux} has no GNU build-id note; {fallback}"
    return build_id, None


def _refusals_for_files(files: list[str]) -> list[str]:
    out = []
    for f in files:
        if KBUILD_FILES.search(f) and not f.startswith(("Documentation/", "tools/", "samples/")):
            out.append(f"{f}: changes to Kconfig or Makefiles cannot be applied live")
    return out


def pre_record(obj: ObjectFile, objname: str, item: Item, referenced_only: bool = False
               ) -> PreFunction:
    relocs = []
    for r in item.relocs:
        t = obj.target(r)
        local = False
        if t.kind == "sym":
            sym = obj.functions.get(t.name) or obj.data_objects.get(t.name)
            local = (sym.symbol.bind == "STB_LOCAL") if sym else r.symbol.bind == "STB_LOCAL"
        relocs.append(Relocation(r.offset - item.start, r.type, t.kind, t.name, t.offset, local))
    return PreFunction(
        target=VMLINUX, object=objname, name=item.name, size=item.size,
        local=item.symbol.bind == "STB_LOCAL", type=item.symbol.type,
        code=base64.b64encode(item.data).decode(), relocs=relocs,
        masks=[Mask(s.offset, s.length, s.kind) for s in runtime_patched_sites(obj, item)],
        fentry=fentry_offset(obj, item), section=item.section.name,
        referenced_only=referenced_only)


def fingerprint(record: PreFunction) -> str:
    """SHA-256 of a function's pre code with its relocated fields zeroed."""
    data = bytearray(record.data())
    for r in record.relocs:
        data[r.offset:r.offset + r.width] = bytes(r.width)
    return hashlib.sha256(bytes(data)).hexdigest()


def default_id(patch: str, config: Path) -> str:
    return "ls-" + hashlib.sha256(patch.encode() + config_hash(config).encode()).hexdigest()[:10]


def create(source: Path, config: Path, patch: str, update_id: str | None = None,
           output: Path | None = None, jobs: int | None = None, target_abi: str | None = None,
           source_version: str | None = None, signing_key=None) -> CreateResult:
    """`signing_key`: an Ed25519 private key (signing.load_private_key) to sign the package with."""
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    if not patch.strip():
        raise BadInput("the patch is empty")
    files = patch_files(patch)
    if not files:
        raise BadInput("the patch names no files (expected a unified diff, -p1)")
    update_id = update_id or default_id(patch, config)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", update_id):
        raise BadInput(f"--id {update_id!r}: use 1-40 letters, digits, '-' or '_'")
    output = output or Path(f"livesplice-{update_id}.tar.gz")
    if not output.parent.is_dir():
        raise BadInput(f"output directory {output.parent} does not exist")

    tree = WorkTree(source, config, jobs)
    # A fixed place per id: the module's debug info names it, and the same change must give
    # the same package.
    work = _tmp_root() / f"create-{update_id}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        with tree.locked():
            tree.sync()
            tree.prepare()
            timings["prepare"] = time.monotonic() - t0
            target = find_target(tree, target_abi)
            if target.build_id_note:
                console.print(f"[yellow]warning:[/] {target.build_id_note}", highlight=False)
            pair = build_pre_post(tree, patch, work)
        timings["build"] = time.monotonic() - t0 - timings["prepare"]

        t1 = time.monotonic()
        diffs: list[ObjectDiff] = []
        objects: dict[str, tuple[ObjectFile, ObjectFile]] = {}
        refusals = _refusals_for_files(files)
        for o in pair.objects:
            pre, post = ObjectFile(pair.pre_dir / o), ObjectFile(pair.post_dir / o)
            objects[o] = (pre, post)
            d = diff_objects(pre, post, o)
            if o.endswith(".o") and (tree.src / (o[:-2] + ".S")).exists() and d.has_changes:
                d.refusals.append(f"{o}: assembly code changed; livesplice updates C functions only")
            if d.has_changes:
                d.refusals += [f"{o}: changed layout of {c}" for c in layout_changes(pre, post)]
            diffs.append(d)
            refusals += d.refusals
        timings["diff"] = time.monotonic() - t1
        if refusals:
            raise Refused("the change cannot be applied live", sorted(set(refusals)))
        if not any(d.has_changes for d in diffs):
            shifted = [f for d in diffs for f in d.line_only]
            raise NothingToDo("no function's object code changed"
                              + (f" (only __LINE__ values moved in {', '.join(shifted)})"
                                 if shifted else ""))
        if not any(d.changed for d in diffs):
            added = [c.name for d in diffs for c in d.new]
            raise NothingToDo("no existing function's object code changed; the new functions "
                              f"({', '.join(added)}) are called by nothing the kernel runs")

        t2 = time.monotonic()
        code = NewCode()
        for d in diffs:
            if not d.has_changes:
                continue
            pre, post = objects[d.object]
            included = {c.name for c in d.changed + d.new}
            included |= {p for c in d.changed + d.new for p in c.parts}
            ex = Extractor(code, d.object, post, d.names, included)
            for c in d.changed + d.new:
                ex.add_function(post.functions[c.name])
                for part in c.parts:
                    ex.add_function(post.functions[part])
        code.bind_own_globals()
        check_problems(code)
        module_name = Manifest.module_name(update_id)
        ko = build_module(code, module_name, update_id, target.headers, work / "module",
                          tree.jobs)
        core = build_core(target.headers, work / "core", tree.jobs)
        timings["module"] = time.monotonic() - t2

        pre_code = _pre_code(diffs, objects, code)
        manifest = build_manifest(update_id, target, tree, patch, diffs, code, pre_code,
                                  module_name, source_version)
        package = Package(manifest, PreCode(pre_code),
                          {f"modules/{module_name}.ko": ko.read_bytes(),
                           "modules/livesplice_core.ko": core.read_bytes()})
        package.write(output, signing_key)
        timings["total"] = time.monotonic() - t0
        return CreateResult(package, output, diffs, timings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tmp_root() -> Path:
    root = debian.cache_root() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _pre_code(diffs: list[ObjectDiff], objects, code: NewCode) -> list[PreFunction]:
    """Pre code of every replaced function (and its parts), of every function the new code calls
    that the objects define, and of functions that use local data the new code uses: matching
    them against the running kernel decides which of several same-named symbols is meant."""
    records: dict[tuple[str, str], PreFunction] = {}

    def add(objname: str, pre: ObjectFile, name: str, referenced_only: bool = False) -> None:
        if (objname, name) not in records and name in pre.functions:
            records[(objname, name)] = pre_record(pre, objname, pre.functions[name],
                                                  referenced_only)

    for d in diffs:
        pre, _ = objects[d.object]
        for c in d.changed:
            add(d.object, pre, c.pre_name)
            for part in c.parts:
                add(d.object, pre, d.names.get(part, part))
    for ref in code.refs.values():
        if not ref.local:
            continue
        pre, _ = objects[ref.object]
        if ref.kind == "func":
            add(ref.object, pre, ref.name, referenced_only=True)
            continue
        # Init code is gone from the running kernel: only code that is still there can tell.
        users = [f for f in pre.functions.values() if section_kind(f.section.name) == "normal"
                 and any(pre.target(r).name == ref.name for r in f.relocs)]
        for f in users[:3]:
            add(ref.object, pre, f.name, referenced_only=True)
    return list(records.values())


def build_manifest(update_id: str, target: Target, tree: WorkTree, patch: str,
                   diffs: list[ObjectDiff], code: NewCode, pre_code: list[PreFunction],
                   module_name: str, source_version: str | None) -> Manifest:
    by_key = {r.key: r for r in pre_code}
    replaced = []
    for d in diffs:
        for c in d.changed:
            rec = by_key[(d.object, c.pre_name)]
            replaced.append(ReplacedFunction(
                target=VMLINUX, object=d.object, name=c.pre_name, new_name=c.name,
                size=c.pre_size, new_size=c.size, section=c.section,
                parts=[d.names.get(p, p) for p in c.parts], new_parts=c.parts,
                # where apply finds the new code: the module's sections
                new_section=section_name(d.object, c.name),
                new_part_sections=[section_name(d.object, p) for p in c.parts],
                pre_sha256=fingerprint(rec), local=rec.local))
    return Manifest(
        format=FORMAT_VERSION,
        id=update_id,
        created=pkgformat.now(),
        kernel=KernelIdentity(target.release, target.version, target.stock, target.build_id),
        targets=[PatchedObject(VMLINUX, target.build_id)],
        source=Source(str(tree.source), source_version, kernel_release(tree.src, {})),
        config_sha256=config_hash(tree.config_path),
        patch=patch,
        module=ModuleFile(module_name, f"modules/{module_name}.ko"),
        replaced=replaced,
        new=[NewFunction(VMLINUX, d.object, c.name, c.size, c.parts, section_name(d.object, c.name),
                         [section_name(d.object, p) for p in c.parts])
             for d in diffs for c in d.new],
        kernel_refs=list(code.refs.values()),
        callbacks=callbacks(code),
        line_only=[f for d in diffs for f in d.line_only],
        notes=[n for d in diffs for n in d.notes] + code.notes
        + ([f"target: {target.build_id_note}"] if target.build_id_note else []),
    )
