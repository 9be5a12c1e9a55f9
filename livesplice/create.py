"""`create`: from a source tree, its config and a patch, an update package.

`create()` is the pipeline, one named stage after another: check the request, prepare the work
tree, find the target kernel, build the pre and post objects (build), diff them and refuse what
cannot change live (objdiff, structlayout), extract the new code into a module and build it
with the core module (newcode), record the pre code run-pre matching needs, write the package
(package).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import debian, pkgformat
from .build import BuiltPair, WorkTree, build_pre_post
from .elfmodel import Item, ObjectFile, fentry_offset, runtime_patched_sites
from .errors import DATA_CHANGE_HINT, BadInput, NothingToDo, Refused
from .includes import LeftOut
from .kbuild import console
from .kconfig import config_hash, kernel_release
from .moduletargets import exporters, hold_module_fields, module_files, place_in_modules
from .newcode import (
    Extractor,
    NewCode,
    build_module,
    callbacks,
    check_problems,
    core_module,
    mark_address_taken,
    rewrite_section,
    section_name,
)
from .objdiff import ObjectDiff, diff_objects, section_kind
from .package import Package
from .patches import patch_files
from .pkgformat import (
    FORMAT_VERSION,
    VMLINUX,
    HeldField,
    Hook,
    KernelIdentity,
    Manifest,
    Mask,
    ModuleFile,
    NewFunction,
    PatchedObject,
    PreCode,
    PreFunction,
    Range,
    Relocation,
    ReplacedFunction,
    Rewrite,
    Source,
)
from .stockmodule import ModuleImage
from .structlayout import layout_refusals

KBUILD_FILES = re.compile(r"(^|/)(Kconfig[^/]*|Makefile[^/]*|Kbuild[^/]*)$")


@dataclass
class TargetKernel:
    """The kernel an update is for."""

    release: str
    version: str | None  # the image's version banner (release (builder) #N ...), if known
    headers: Path
    stock: str | None = None
    # The GNU build id of the target's vmlinux, its identity for apply's check (None: unknown,
    # `build_id_note` says why; apply then falls back to the release and version banner).
    build_id: str | None = None
    build_id_note: str | None = None
    modules: Path | None = None  # its compiled modules (/lib/modules/RELEASE), if at hand


@dataclass
class CreateResult:
    package: Package
    path: Path
    diffs: list[ObjectDiff]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Request:
    """What create was asked for, checked."""

    patch: str
    files: list[str]  # that the patch touches
    update_id: str
    output: Path


@dataclass
class Modules:
    name: str
    update: bytes  # the new code's module
    core: bytes
    held: list[HeldField]  # its fields that refer into module targets (moduletargets)


ObjectPairs = dict[str, tuple[ObjectFile, ObjectFile]]


def create(source: Path, config: Path, patch: str, update_id: str | None = None,
           output: Path | None = None, jobs: int | None = None, target_abi: str | None = None,
           source_version: str | None = None, signing_key=None) -> CreateResult:
    """`signing_key`: an Ed25519 private key (signing.load_private_key) to sign the package with."""
    timings: dict[str, float] = {}
    with stage_timer(timings, "total"):
        with stage_timer(timings, "prepare"):
            request = check_request(patch, config, update_id, output)
            tree = WorkTree(source, config, jobs, log_name=f"create-{request.update_id}")
        with work_dir(request.update_id) as work:
            with tree.locked():  # from the sync to the last object copied out
                with stage_timer(timings, "prepare"):
                    tree.sync_and_prepare()
                with stage_timer(timings, "build"):
                    target = find_target_kernel(tree, target_abi)
                    pair = build_pre_post(tree, request.patch, work)
            with stage_timer(timings, "diff"):
                objects = read_objects(pair)
                diffs = diff_all_objects(tree, objects, pair.targets)
                refuse_what_cannot_change_live(request.files, diffs, pair.left_out)
                refuse_when_no_function_changed(diffs, pair.left_out)
            with stage_timer(timings, "module"):
                images = module_images(target, pair)
                code = extract_new_code(diffs, objects, pair.targets, images)
                pre_code = record_pre_code(diffs, objects, code, pair.targets)
                pre_objects = record_pre_objects(diffs, objects)
                place_in_modules(pre_code, code, images,
                                 exporters(target.headers / "Module.symvers"))
                modules = build_modules(code, request.update_id, target, tree.jobs, work)
            manifest = build_manifest(request.update_id, target, tree, request.patch, diffs, code,
                                      pre_code, modules, source_version, pair, images,
                                      pre_objects)
            package = write_package(manifest, pre_code, pre_objects, modules, request.output,
                                    signing_key)
    return CreateResult(package, request.output, diffs, timings)


@contextmanager
def stage_timer(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the time spent inside to timings[name]."""
    t = time.monotonic()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.monotonic() - t


# --- the stages, in order --------------------------------------------------------------------

def check_request(patch: str, config: Path, update_id: str | None,
                  output: Path | None) -> Request:
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
    return Request(patch, files, update_id, output)


@contextmanager
def work_dir(update_id: str) -> Iterator[Path]:
    """A fixed place per id, emptied before and removed after: the module's debug info names
    it, and the same change must give the same package."""
    root = debian.cache_root() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    work = root / f"create-{update_id}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def find_target_kernel(tree: WorkTree, target_abi: str | None) -> TargetKernel:
    """The kernel the update is for: a stock kernel named or recognised by its config."""
    if target_abi is None:
        own = tree.config.sha256
        for abi in debian.KNOWN_KERNELS:
            files = debian.kernel_files(abi)
            if files.config.exists() and config_hash(files.config) == own:
                target_abi = abi
                break
    if target_abi is not None:
        files = debian.kernel_files(target_abi)
        if not (files.root / ".complete").exists() or not files.headers.exists():
            files = debian.fetch_kernel(target_abi, with_source=False)
        target = TargetKernel(target_abi, debian.image_version(files.vmlinuz), files.headers,
                              target_abi, debian.image_build_id(files), modules=files.modules)
    else:
        release = kernel_release(tree.src, tree.config.options)
        headers = Path(f"/lib/modules/{release}/build")
        if not headers.exists():
            raise BadInput(f"no headers for kernel {release} at {headers}: pass --target with a "
                           "stock kernel, or install that kernel's headers")
        build_id, note = tree_build_id(tree.source / "vmlinux", release)
        target = TargetKernel(release, None, headers, None, build_id, note,
                              modules=Path(f"/lib/modules/{release}"))
    if target.build_id_note:
        console.print(f"[yellow]warning:[/] {target.build_id_note}", highlight=False)
    return target


def read_objects(pair: BuiltPair) -> ObjectPairs:
    """Each object's pre and post build, parsed once for every stage after."""
    return {o: (ObjectFile(pair.pre_dir / o), ObjectFile(pair.post_dir / o)) for o in pair.objects}


def diff_all_objects(tree: WorkTree, objects: ObjectPairs,
                     targets: dict[str, str]) -> list[ObjectDiff]:
    diffs = []
    for o, (pre, post) in objects.items():
        d = diff_objects(pre, post, o, None if targets[o] == VMLINUX else targets[o])
        if d.has_changes and (tree.src / (o[:-2] + ".S")).exists():
            d.refusals.append(f"{o}: assembly code changed; livesplice updates C functions only")
        if d.has_changes:
            d.refusals += layout_refusals(o, pre, post)
        diffs.append(d)
    return diffs


def refuse_what_cannot_change_live(files: list[str], diffs: list[ObjectDiff],
                                   left_out: list[LeftOut]) -> None:
    """Refuse (exit 3) what cannot change live, and any change to code the running kernel has
    that the update would leave out (module code): applying the rest would leave the fix half
    done while reporting success."""
    refusals = _refusals_for_files(files) + [r for d in diffs for r in d.refusals]
    refusals += [str(f) for f in left_out if f.built]
    if refusals:
        data = any("changed data object" in r or "changed layout of" in r for r in refusals)
        raise Refused("the change cannot be applied live"
                      + (f" ({DATA_CHANGE_HINT})" if data else ""), sorted(set(refusals)))


def refuse_when_no_function_changed(diffs: list[ObjectDiff], left_out: list[LeftOut]) -> None:
    """Nothing to do (exit 4) only when the running kernel's code would not change at all; the
    message says which files were left out and why (none of them is code this kernel runs)."""
    aside = f"; left out: {'; '.join(map(str, left_out))}" if left_out else ""
    if not any(d.has_changes for d in diffs):
        shifted = [f for d in diffs for f in d.line_only]
        raise NothingToDo("no function's object code changed"
                          + (f" (only __LINE__ values moved in {', '.join(shifted)})"
                             if shifted else "") + aside)
    if not any(d.changed or d.hooks or d.rewrites for d in diffs):
        added = [c.name for d in diffs for c in d.new]
        raise NothingToDo("no existing function's object code changed; the new functions "
                          f"({', '.join(added)}) are called by nothing the kernel runs" + aside)


def extract_new_code(diffs: list[ObjectDiff], objects: ObjectPairs, targets: dict[str, str],
                     images: dict[str, ModuleImage] | None = None) -> NewCode:
    """The changed and new functions (with their parts) of every object, in one new object."""
    code = NewCode()
    for d in diffs:
        if not d.has_changes:
            continue
        _, post = objects[d.object]
        included = {c.name for c in d.changed + d.new}
        included |= {p for c in d.changed + d.new for p in c.parts}
        image = (images or {}).get(targets[d.object])
        ex = Extractor(code, d.object, post, d.names, included, targets[d.object],
                       image.defines if image is not None else None)
        for c in d.changed + d.new:
            ex.add_function(post.functions[c.name])
            for part in c.parts:
                ex.add_function(post.functions[part])
        for w in d.rewrites:
            ex.add_rewrite(post.data_objects[w.name], w.ranges)
    code.bind_own_globals()
    mark_address_taken(code)
    check_problems(code)
    return code


def module_images(target: TargetKernel, pair: BuiltPair) -> dict[str, ModuleImage]:
    """The target kernel's compiled modules that the update changes code of: where create finds
    their build ids and the positions of the update's symbols in them (moduletargets)."""
    if not pair.module_paths:
        return {}
    if target.modules is None:
        raise BadInput("the patch changes module code, but the target kernel's modules are not "
                       "at hand")
    files = module_files(target.modules, pair.module_paths)
    return {name: ModuleImage(path, name) for name, path in files.items()}


def build_modules(code: NewCode, update_id: str, target: TargetKernel, jobs: int,
                  work: Path) -> Modules:
    name = Manifest.module_name(update_id)
    core, core_symvers = core_module(target.headers, target.release, target.build_id,
                                     work / "core", jobs)
    ko = build_module(code, name, update_id, target.headers, work / "module", jobs, core_symvers)
    update, held = hold_module_fields(ko.read_bytes(), code, list(code.refs.values()))
    return Modules(name, update, core, held)


def record_pre_code(diffs: list[ObjectDiff], objects: ObjectPairs, code: NewCode,
                    targets: dict[str, str]) -> list[PreFunction]:
    """Pre code of every replaced function (and its parts), of every function the new code calls
    that the objects define, and of functions that use local data the new code uses: matching
    them against the running kernel decides which of several same-named symbols is meant."""
    records: dict[tuple[str, str], PreFunction] = {}

    def add(objname: str, pre: ObjectFile, name: str | None, referenced_only: bool = False) -> None:
        if name is not None and (objname, name) not in records and name in pre.functions:
            records[(objname, name)] = pre_record(pre, objname, pre.functions[name],
                                                  referenced_only, targets[objname])

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


def record_pre_objects(diffs: list[ObjectDiff], objects: ObjectPairs) -> list[PreFunction]:
    """The pre contents of each object rewritten in place, all of which run-pre matching
    compares with the running kernel: an __ro_after_init object that boot wrote (an id a
    registration assigned) does not match, since what boot derived from the old contents would
    not be derived again."""
    return [pre_record(objects[d.object][0], d.object, objects[d.object][0].data_objects[w.pre_name])
            for d in diffs for w in d.rewrites]


def write_package(manifest: Manifest, pre_code: list[PreFunction], pre_objects: list[PreFunction],
                  modules: Modules, output: Path, signing_key) -> Package:
    package = Package(manifest, PreCode(pre_code, pre_objects),
                      {f"modules/{modules.name}.ko": modules.update,
                       "modules/livesplice_core.ko": modules.core})
    package.write(output, signing_key)
    return package


# --- what the stages use ---------------------------------------------------------------------

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


def pre_record(obj: ObjectFile, objname: str, item: Item, referenced_only: bool = False,
               target: str = VMLINUX) -> PreFunction:
    relocs = []
    for r in item.relocs:
        t = obj.target(r)
        local = False
        if t.kind == "sym":
            sym = obj.functions.get(t.name) or obj.data_objects.get(t.name)
            local = (sym.symbol.bind == "STB_LOCAL") if sym else r.symbol.bind == "STB_LOCAL"
        relocs.append(Relocation(r.offset - item.start, r.type, t.kind, t.name, t.offset, local, 0))
    return PreFunction(
        target=target, object=objname, name=item.name, size=item.size,
        local=item.symbol.bind == "STB_LOCAL", type=item.symbol.type,
        code=base64.b64encode(item.data).decode(), relocs=relocs,
        masks=[Mask(s.offset, s.length, s.kind) for s in runtime_patched_sites(obj, item)],
        fentry=fentry_offset(obj, item), section=item.section.name,
        referenced_only=referenced_only, sympos=0)  # (a module's: place_in_modules)


def fingerprint(record: PreFunction) -> str:
    """SHA-256 of a function's pre code with its relocated fields zeroed."""
    data = bytearray(record.data())
    for r in record.relocs:
        data[r.offset:r.offset + r.width] = bytes(r.width)
    return hashlib.sha256(bytes(data)).hexdigest()


def default_id(patch: str, config: Path) -> str:
    return "ls-" + hashlib.sha256(patch.encode() + config_hash(config).encode()).hexdigest()[:10]


def build_manifest(update_id: str, target: TargetKernel, tree: WorkTree, patch: str,
                   diffs: list[ObjectDiff], code: NewCode, pre_code: list[PreFunction],
                   modules: Modules, source_version: str | None, pair: BuiltPair,
                   images: dict[str, ModuleImage], pre_objects: list[PreFunction]) -> Manifest:
    left_out = pair.left_out
    by_object = {r.key: r for r in pre_objects}
    module_name = modules.name
    by_key = {r.key: r for r in pre_code}
    replaced = []
    for d in diffs:
        for c in d.changed:
            assert c.pre_name is not None  # a changed function has a pre name; a new one has not
            rec = by_key[(d.object, c.pre_name)]
            replaced.append(ReplacedFunction(
                target=pair.targets[d.object], object=d.object, name=c.pre_name, new_name=c.name,
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
        kernel=KernelIdentity(target.release, target.version, target.stock, target.build_id,
                              tree.config.options.get("CONFIG_X86_KERNEL_IBT") == "y"),
        targets=[PatchedObject(name, target.build_id if name == VMLINUX else images[name].build_id)
                 for name in sorted({pair.targets[d.object] for d in diffs if d.has_changes},
                                    key=lambda n: (n != VMLINUX, n))],
        source=Source(str(tree.source), source_version, kernel_release(tree.src, {})),
        config_sha256=tree.config.sha256,
        patch=patch,
        module=ModuleFile(module_name, f"modules/{module_name}.ko"),
        replaced=replaced,
        new=[NewFunction(pair.targets[d.object], d.object, c.name, c.size, c.parts,
                         section_name(d.object, c.name), [section_name(d.object, p) for p in c.parts])
             for d in diffs for c in d.new],
        kernel_refs=list(code.refs.values()),
        held=modules.held,
        callbacks=callbacks(code),
        line_only=[f for d in diffs for f in d.line_only],
        hooks=[Hook(kind, pair.targets[d.object], d.object, function,
                    section_name(d.object, function)) for d in diffs for kind, function in d.hooks],
        rewrites=[Rewrite(pair.targets[d.object], d.object, w.pre_name,
                          by_object[(d.object, w.pre_name)].local, w.size, w.section,
                          w.ro_after_init, rewrite_section(d.object, w.name),
                          [Range(start, length) for start, length in w.ranges])
                  for d in diffs for w in d.rewrites],
        notes=[n for d in diffs for n in d.notes] + code.notes
        + [f"left out: {f}" for f in left_out]
        + ([f"target: {target.build_id_note}"] if target.build_id_note else []),
    )
