"""Which objects (of vmlinux or of a module) a changed file can affect.

For a changed `.c` or `.S`, its own object. For a changed header, the objects whose sources include
it: first found by resolving `#include` lines as the compiler does (cheap, nothing built, but blind
to `#if`), then confirmed by the dependency lists fixdep writes into each built object's .cmd file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .kbuild import Kbuild, ObjectTree
from .pkgformat import VMLINUX

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


@dataclass
class LeftOut:
    """A changed file whose change livesplice does not apply, and why."""

    file: str
    why: str
    built: bool  # code the running kernel has (in a module): leaving it out leaves a fix out

    def __str__(self) -> str:
        return f"{self.file}: {self.why}"


def module_name(module_path: str) -> str:
    """The name a module loads as, from kbuild's path for it (drivers/net/wireguard/wireguard)."""
    return Path(module_path).name.replace("-", "_")


class ObjectDependencies:
    """Which objects, of vmlinux and of the modules, depend on which files of the mirrored tree."""

    def __init__(self, objects: ObjectTree, kbuild: Kbuild):
        self.objects, self.kbuild = objects, kbuild
        self.src = kbuild.src
        self.graph = IncludeGraph(self.src)
        self._by_source: dict[str, str] | None = None

    def by_source(self) -> dict[str, str]:
        """Source file (.c or .S) -> its object, of vmlinux or of a module."""
        if self._by_source is None:
            out: dict[str, str] = {}
            for o in sorted(self.objects.vmlinux_objects) + sorted(self.modules()):
                if "/../" in o:
                    continue  # (kvm's virt/kvm objects, named from arch/x86/kvm: `elsewhere`)
                for ext in (".c", ".S"):
                    out.setdefault(o[:-2] + ext, o)
            self._by_source = out
        return self._by_source

    def elsewhere(self) -> dict[str, str]:
        """Source -> object, for the objects kbuild names from another directory
        (arch/x86/kvm/../../../virt/kvm/kvm_main.o): built into a module, but not by a name
        livesplice's object paths allow."""
        out = {}
        for o in self.modules():
            if "/../" in o:
                for ext in (".c", ".S"):
                    out[os.path.normpath(o[:-2] + ext)] = o
        return out

    def modules(self) -> dict[str, str]:
        """Object -> kbuild's path of the module it is linked into (fs/ext4/ext4)."""
        if self.objects.config.options.get("CONFIG_MODULES") != "y":
            return {}
        return self.objects.module_objects()

    def target_of(self, obj: str) -> str:
        """vmlinux, or the name of the module the object is linked into."""
        module = self.modules().get(obj)
        return module_name(module) if module is not None else VMLINUX

    def deps(self, obj: str) -> set[str]:
        """The files an object was built from, per its .cmd file (relative to the source tree)."""
        cmd = self.objects.cmd_file(obj)
        if not cmd.exists():
            return set()
        prefix = str(self.src) + "/"
        return {token[len(prefix):] for token in re.split(r"[\s\\]+", cmd.read_text(errors="replace"))
                if token.startswith(prefix)}

    def candidate_objects(self, included: list[str]) -> set[str]:
        """Objects whose sources may include any of `included` (nothing built)."""
        by_source = self.by_source()
        return {by_source[s] for s in self.graph.includers(included, sorted(by_source))}

    def left_out(self, changed: list[str], wanted: list[str]) -> list[LeftOut]:
        """The changed files whose effect is not in the objects `wanted` (what `objects_for`
        gave), each with why: another architecture's, not built by this config, not kernel code
        at all (none of these is code the running kernel has), or code of an object livesplice
        cannot build by its kbuild name (`elsewhere`: `built`, so create refuses)."""
        by_source = self.by_source()
        elsewhere = self.elsewhere()
        used = set().union(*(self.deps(o) for o in wanted)) if wanted else set()
        out = []
        for f in changed:
            if f in by_source or f in used:
                continue
            if f in elsewhere:
                out.append(LeftOut(f, f"built into module {module_name(self.modules()[elsewhere[f]])} "
                                      f"as {elsewhere[f]}, a path livesplice does not build yet", True))
            elif f.startswith(_NOT_KERNEL) or not f.endswith(_BUILT_FROM):
                out.append(LeftOut(f, "not kernel code", False))
            elif f.startswith("arch/") and not f.startswith("arch/x86/"):
                out.append(LeftOut(f, "another architecture's", False))
            elif f.endswith((".c", ".S")):
                out.append(LeftOut(f, "not built by this config", False))
            elif self.graph.includers([f], sorted(elsewhere)):
                out.append(LeftOut(f, "included by code built from another directory's path "
                                      "(kvm's virt/kvm), which livesplice does not build yet", True))
            else:
                out.append(LeftOut(f, "included by nothing this config builds", False))
        return out

    def objects_for(self, changed: list[str]) -> list[str]:
        """The objects whose code may depend on the changed files. Candidates for a
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
