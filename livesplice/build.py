"""Build: the pre and post objects a patch needs, in a cached, prepared copy of the kernel tree.

The parts, one job each: the source mirror (`mirror.SourceMirror`: the user's tree is never
written), make and the object tree of one config (`kbuild.Kbuild`, `kbuild.ObjectTree`: which
objects make up vmlinux), which objects a changed file affects (`includes.ObjectDependencies`) and
the config's checks (`kconfig.KernelConfig`). `WorkTree` puts them together for one source tree and
config.

The object tree keeps the *pre* state between runs, so pre objects are reused: a create patches the
mirror, builds the post objects, copies them out, and restores the mirror. A header patch that
edits a struct is first tried on one object that uses the struct: a layout change is refused then,
before every object that includes the header is built twice.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .elfmodel import ObjectFile
from .errors import DATA_CHANGE_HINT, Refused
from .includes import LeftOut, ObjectDependencies
from .kbuild import Kbuild, ObjectTree
from .kconfig import KernelConfig
from .mirror import SourceMirror
from .objdiff import diff_objects
from .patches import apply_patch, changed_lines, check_patch_applies, patch_files
from .structlayout import layout_refusals, layouts, structs_at_lines

log = logging.getLogger(__name__)

# Objects tried, per struct a header patch edits, before leaving it to the full build: the first
# whose DWARF describes the struct decides.
PROBES_PER_STRUCT = 3


class WorkTree:
    """A source tree and config ready to build in: the mirror, the config, make, the object tree
    and its dependency lookup."""

    def __init__(self, source: Path, config: Path, jobs: int | None = None, log_name: str = "build"):
        self.mirror = SourceMirror(source)
        self.config = KernelConfig(config)
        self.jobs = jobs or os.cpu_count() or 1
        obj = self.mirror.root / f"obj-{self.config.sha256[:16]}"
        self.kbuild = Kbuild(self.mirror.src, obj, self.config.compiler(), self.jobs, log_name,
                             self.config.make_variables())
        self.objects = ObjectTree(self.kbuild, self.config)
        self.deps = ObjectDependencies(self.objects, self.kbuild)

    @property
    def source(self) -> Path:
        """The user's tree."""
        return self.mirror.source

    @property
    def src(self) -> Path:
        """Its mirror, where builds happen."""
        return self.mirror.src

    @property
    def obj(self) -> Path:
        return self.kbuild.obj

    def locked(self) -> AbstractContextManager[None]:
        return self.mirror.locked()

    def sync_and_prepare(self) -> None:
        self.mirror.sync()
        self.objects.prepare()


@dataclass
class BuiltPair:
    objects: list[str]  # e.g. ["kernel/sys.o"]
    pre_dir: Path
    post_dir: Path
    left_out: list[LeftOut]  # changed files whose effect is not in `objects`, and why
    targets: dict[str, str]  # object -> vmlinux, or the module it is linked into
    module_paths: dict[str, str]  # module name -> kbuild's path for it (fs/ext4/ext4)


def build_pre_post(tree: WorkTree, patch: str, out: Path) -> BuiltPair:
    """Build the pre and post objects a patch needs, into out/pre and out/post."""
    files = patch_files(patch)
    check_patch_applies(tree.src, patch)
    refuse_struct_layout_change_early(tree, patch, out / "probe")
    objects = tree.deps.objects_for(files)
    pre_dir, post_dir = out / "pre", out / "post"
    tree.kbuild.build(objects)
    _copy_objects(tree, objects, pre_dir, objtool=True)
    with patch_applied(tree, patch, objects) as new_files:
        # Files the patch adds do not exist before it: find their objects once it is applied.
        if new_files:
            objects[:] = sorted(set(objects) | set(tree.deps.objects_for(new_files)))
        for o in objects:  # make must not take the pre object for an up-to-date post one
            (tree.obj / o).unlink(missing_ok=True)
        tree.kbuild.build(objects)
        _copy_objects(tree, objects, post_dir, objtool=True)
    modules = tree.deps.modules()
    targets = {o: tree.deps.target_of(o) for o in objects}
    paths = {tree.deps.target_of(o): modules[o] for o in objects if o in modules}
    return BuiltPair(objects, pre_dir, post_dir, tree.deps.left_out(files, objects), targets, paths)


@contextmanager
def patch_applied(tree: WorkTree, patch: str, objects: list[str]) -> Iterator[list[str]]:
    """The mirror with the patch applied (yields the files it adds). Afterwards the pre state is
    back exactly: the sources with their times, and each of `objects` (the list as it is then)
    with its .cmd file, so that make takes the pre objects as up to date next time."""
    files = patch_files(patch)
    backups: dict[str, tuple[bytes, int] | None] = {}
    for f in files:
        p = tree.src / f
        backups[f] = (p.read_bytes(), p.stat().st_mtime_ns) if p.exists() else None
    saved = {o: [(p, p.read_bytes(), p.stat().st_mtime_ns) for p in _object_files(tree, o)]
             for o in objects}
    try:
        apply_patch(tree.src, patch)
        yield [f for f in files if backups[f] is None]
    finally:
        for f, backup in backups.items():
            p = tree.src / f
            if backup is None:
                p.unlink(missing_ok=True)
            else:
                p.write_bytes(backup[0])
                os.utime(p, ns=(backup[1], backup[1]))
        for o in objects:
            for p, data, mtime in saved.get(o, []):
                p.write_bytes(data)
                os.utime(p, ns=(mtime, mtime))
            if o not in saved:
                (tree.obj / o).unlink(missing_ok=True)


def refuse_struct_layout_change_early(tree: WorkTree, patch: str, workdir: Path) -> None:
    """Refused if the patch edits a struct or union of a header and an object that uses it shows
    a layout change where its code changed (the full diff's rule, and its reason); built: a few
    objects at most, pre and post. Otherwise (no struct edited, no such object found, or the
    layout unchanged) the full build decides."""
    edited: dict[str, str] = {}  # "struct foo" -> the header that defines it
    for header, positions in changed_lines(patch).items():
        path = tree.src / header
        if header.endswith(".h") and path.is_file():
            for name in structs_at_lines(path.read_text(errors="replace"), positions):
                edited.setdefault(name, header)
    if not edited:
        return
    candidates = tree.deps.candidate_objects(sorted(set(edited.values())))
    tried: set[str] = set()
    for name, header in sorted(edited.items()):
        for obj in _users_first(tree, candidates - tried, name)[:PROBES_PER_STRUCT]:
            tried.add(obj)
            probe = _probe(tree, patch, obj, header, name, workdir)
            if probe.refusals:
                raise Refused(f"the change cannot be applied live ({DATA_CHANGE_HINT})",
                              probe.refusals)
            if probe.describes and not probe.layout_changed:
                break  # the struct's layout is the same after the patch


class Probe(NamedTuple):
    describes: bool  # the object's DWARF describes the struct, pre and post
    layout_changed: bool  # of any struct or union the object describes
    refusals: list[str]  # the full diff's layout refusals for it (only where its code changed)


def _users_first(tree: WorkTree, candidates: set[str], name: str) -> list[str]:
    """Candidate objects whose C source names the struct: already built ones first (their pre
    build is done), then those that name it most (the likeliest to use its members)."""
    named = re.compile(r"\b" + r"\s+".join(map(re.escape, name.split())) + r"\b")
    users = []
    for obj in candidates:
        try:
            text = (tree.src / (obj[:-2] + ".c")).read_text(errors="replace")
        except OSError:
            continue
        mentions = len(named.findall(text))
        if mentions:
            users.append((not (tree.obj / obj).exists(), -mentions, obj))
    return [obj for *_, obj in sorted(users)]


def _probe(tree: WorkTree, patch: str, obj: str, header: str, name: str, workdir: Path) -> Probe:
    """Build `obj` pre and post and compare the layouts its DWARF describes."""
    log.info("trying %s first: it uses %s of %s", obj, name, header)
    tree.kbuild.build([obj])
    if header not in tree.deps.deps(obj):
        return Probe(False, False, [])
    shutil.rmtree(workdir, ignore_errors=True)
    _copy_objects(tree, [obj], workdir / "pre")
    with patch_applied(tree, patch, [obj]):
        (tree.obj / obj).unlink(missing_ok=True)
        tree.kbuild.build([obj])
        _copy_objects(tree, [obj], workdir / "post")
    pre, post = ObjectFile(workdir / "pre" / obj), ObjectFile(workdir / "post" / obj)
    refusals = layout_refusals(obj, pre, post)
    describes = name in layouts(pre) and name in layouts(post)
    if refusals and not diff_objects(pre, post, obj).has_changes:
        return Probe(describes, True, [])
    return Probe(describes, bool(refusals), refusals)


def _object_files(tree: WorkTree, obj: str) -> list[Path]:
    o = tree.obj / obj
    return [p for p in (o, o.parent / f".{o.name}.cmd") if p.exists()]


def _copy_objects(tree: WorkTree, objects: list[str], dest: Path, objtool: bool = False) -> None:
    """Copy objects out of the object tree; with `objtool`, where kbuild runs objtool only on
    vmlinux.o and linked modules (IBT: the 6.12 line), run it on each copy as kbuild would on
    what it is linked into, so that pre and post objects carry what the running code got from
    it (its return, retpoline and call sites, ORC, its jump label NOPs)."""
    modules = tree.deps.modules() if objtool and tree.objects.delayed_objtool else {}
    for o in objects:
        target = dest / o
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree.obj / o, target)
        if objtool:
            tree.objects.run_delayed_objtool(target, o, module=o in modules)
