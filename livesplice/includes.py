"""Which vmlinux objects a changed file can affect.

For a changed `.c` or `.S`, its own object. For a changed header, the objects whose sources include
it: first found by resolving `#include` lines as the compiler does (cheap, nothing built, but blind
to `#if`), then confirmed by the dependency lists fixdep writes into each built object's .cmd file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .kbuild import Kbuild, ObjectTree

INCLUDE_DIRS = ("arch/x86/include", "arch/x86/include/uapi", "include", "include/uapi")
_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)
_BUILT_FROM = (".c", ".h", ".S", ".inc", ".lds", ".asm")
_NOT_KERNEL = ("Documentation/", "tools/", "samples/", "scripts/")


class IncludeGraph:
    """The #include lines of a source tree, resolved to files of the tree."""

    def __init__(self, src: Path):
        self.src = src
        self._resolved: dict[str, set[str]] = {}

    def includes(self, rel: str) -> set[str]:
        """Files `rel` includes directly: the file's own directory first for "...", then the
        kernel's include directories."""
        if rel in self._resolved:
            return self._resolved[rel]
        self._resolved[rel] = set()
        try:
            text = (self.src / rel).read_text(errors="replace")
        except OSError:
            return self._resolved[rel]
        out = set()
        for kind, name in _INCLUDE.findall(text):
            dirs = ([str(Path(rel).parent)] if kind == '"' else []) + list(INCLUDE_DIRS)
            for d in dirs:
                candidate = os.path.normpath(os.path.join(d, name))
                if (self.src / candidate).is_file():
                    out.add(candidate)
                    break
        self._resolved[rel] = out
        return out

    def includers(self, files: list[str], sources: list[str]) -> set[str]:
        """Those of `sources` that may include any of `files`, directly or through headers
        (ignoring #if: an over-approximation)."""
        targets = set(files)
        memo: dict[str, bool] = {}

        def reaches(rel: str, stack: set[str]) -> bool:
            if rel in memo:
                return memo[rel]
            if rel in stack:
                return False
            stack.add(rel)
            hit = any(inc in targets or reaches(inc, stack) for inc in self.includes(rel))
            stack.discard(rel)
            memo[rel] = hit
            return hit

        return {s for s in sources if (self.src / s).exists() and reaches(s, set())}


class ObjectDependencies:
    """Which vmlinux objects depend on which files of the mirrored tree."""

    def __init__(self, objects: ObjectTree, kbuild: Kbuild):
        self.objects, self.kbuild = objects, kbuild
        self.src = kbuild.src
        self.graph = IncludeGraph(self.src)

    def by_source(self) -> dict[str, str]:
        """Source file (.c or .S) -> its vmlinux object."""
        out = {}
        for o in self.objects.vmlinux_objects:
            for ext in (".c", ".S"):
                out[o[:-2] + ext] = o
        return out

    def deps(self, obj: str) -> set[str]:
        """The files an object was built from, per its .cmd file (relative to the source tree)."""
        cmd = self.objects.cmd_file(obj)
        if not cmd.exists():
            return set()
        prefix = str(self.src) + "/"
        return {token[len(prefix):] for token in re.split(r"[\s\\]+", cmd.read_text(errors="replace"))
                if token.startswith(prefix)}

    def candidate_objects(self, included: list[str]) -> set[str]:
        """vmlinux objects whose sources may include any of `included` (nothing built)."""
        by_source = self.by_source()
        return {by_source[s] for s in self.graph.includers(included, sorted(by_source))}

    def objects_for(self, changed: list[str]) -> list[str]:
        """The vmlinux objects whose code may depend on the changed files. Candidates for a
        changed header are built (pre) to read their dependencies."""
        by_source = self.by_source()
        wanted = {by_source[f] for f in changed if f in by_source}
        # Headers, and other files sources include (.inc, a .c built into another object)
        included = [f for f in changed if f not in by_source and f.endswith(_BUILT_FROM)
                   and not f.startswith(_NOT_KERNEL)]
        if included:
            candidates = self.candidate_objects(included)
            self.kbuild.build(sorted(candidates - wanted))
            wanted |= {o for o in candidates if self.deps(o) & set(included)}
        return sorted(wanted)
