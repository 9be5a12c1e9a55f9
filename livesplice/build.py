"""Source and build: a cached, prepared copy of the kernel tree, and pre/post objects built in it.

The user's source tree is never written to. It is mirrored (rsync, only what changed) into the
cache, and objects are built out of tree (`make O=`) with `-ffunction-sections -fdata-sections`.
The object tree keeps the *pre* state between runs, so pre objects are reused: a create patches the
mirror, builds the post objects, copies them out, and restores the mirror.

Which objects a change needs comes from kbuild itself: the set of objects linked into vmlinux is
read from a dry run of `make vmlinux` right after `make prepare`, and which of them include a
changed file from the dependency lists fixdep writes into each object's .cmd file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from . import debian
from .errors import BadInput, LivespliceError

SECTION_FLAGS = "-ffunction-sections -fdata-sections"
# Options `make olddefconfig` may add or blank in a stock config without it being another kernel's.
CONFIG_ALLOWED_DIFFS = {"CONFIG_BUILD_SALT", "CONFIG_MODULE_SIG_ALL", "CONFIG_MODULE_SIG_KEY",
                        "CONFIG_SYSTEM_TRUSTED_KEYS", "CONFIG_SYSTEM_REVOCATION_KEYS",
                        "CONFIG_SYSTEM_BLACKLIST_HASH_LIST"}
MIRROR_EXCLUDES = [".config", ".config.old", "/include/config/", "/include/generated/",
                   "/arch/*/include/generated/", "*.o", "*.ko", "*.a", ".*.cmd", ".*.d",
                   "/.git/", "/livesplice/"]

# Objects kbuild builds for vmlinux that are not kernel text livesplice could redirect: host tools,
# the vDSO (mapped into user space), real-mode and boot code.
NOT_KERNEL_TEXT = ("scripts/", "tools/", ".tmp", "arch/x86/entry/vdso/", "arch/x86/realmode/",
                   "arch/x86/boot/", "usr/")

console = Console(stderr=True)


def parse_config(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            out[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:].split()[0]] = "n"
    return out


def config_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kernel_release(tree: Path, config: dict[str, str]) -> str:
    """The release string a kernel built from this tree and config reports (uname -r)."""
    version = {}
    with open(tree / "Makefile") as f:
        for line in f:
            m = re.match(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=\s*(\S*)", line)
            if m:
                version[m.group(1)] = m.group(2)
            if len(version) == 4:
                break
    base = f"{version['VERSION']}.{version['PATCHLEVEL']}.{version['SUBLEVEL']}{version.get('EXTRAVERSION', '')}"
    return base + config.get("CONFIG_LOCALVERSION", '""').strip('"')


class WorkTree:
    """The cached mirror of one source tree (src/) and its object tree for one config (obj-HASH/)."""

    def __init__(self, source: Path, config: Path, jobs: int | None = None):
        self.source = source.resolve()
        self.config_path = config.resolve()
        if not (self.source / "Makefile").is_file() or not (self.source / "kernel").is_dir():
            raise BadInput(f"{self.source} is not a kernel source tree (no Makefile and kernel/)")
        if not self.config_path.is_file():
            raise BadInput(f"config file {self.config_path} not found (pass --config)")
        self.config = parse_config(self.config_path)
        if "CONFIG_X86_64" not in self.config:
            raise BadInput(f"{self.config_path} is not an x86-64 kernel config")
        key = hashlib.sha256(str(self.source).encode()).hexdigest()[:16]
        self.root = debian.cache_root() / "trees" / key
        self.src = self.root / "src"
        self.obj = self.root / f"obj-{config_hash(self.config_path)[:16]}"
        self.jobs = jobs or os.cpu_count() or 1
        self.compiler = self._compiler()

    # --- locking, mirroring, preparing -----------------------------------------------------------

    @contextmanager
    def locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _compiler(self) -> str:
        """The compiler the config was made with (Debian: gcc-12), which must be here too."""
        text = self.config.get("CONFIG_CC_VERSION_TEXT", '""').strip('"')
        if not text:
            raise BadInput(f"{self.config_path} has no CONFIG_CC_VERSION_TEXT")
        cc = text.split()[0]
        if not shutil.which(cc):
            raise BadInput(f"the config was made with {text!r} but {cc} is not installed here")
        have = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()
        if not have or have[0].strip() != text:
            raise BadInput(f"the config was made with {text!r}; this machine's {cc} is "
                           f"{have[0] if have else 'unknown'}: objects would not match the kernel")
        return cc

    def sync(self) -> list[str]:
        """Mirror the source into src/; return the paths that changed (their mtimes set to now,
        so that make rebuilds what depends on them even if the source file's time is older)."""
        self.src.mkdir(parents=True, exist_ok=True)
        args = ["rsync", "-a", "--delete", "--out-format=%n"]
        for ex in MIRROR_EXCLUDES:
            args += ["--exclude", ex]
        with console.status(f"mirroring {self.source} into the cache"):
            out = subprocess.run(args + [f"{self.source}/", f"{self.src}/"], capture_output=True,
                                 text=True)
        if out.returncode != 0:
            raise LivespliceError(f"rsync failed: {out.stderr.strip()}")
        changed = [line for line in out.stdout.splitlines() if line and not line.endswith("/")]
        if (self.root / ".synced").exists():  # the first copy: nothing has been built from it yet
            now = time.time()
            for rel in changed:
                p = self.src / rel
                if p.exists() and not p.is_symlink():
                    os.utime(p, (now, now))
        (self.root / ".synced").touch()
        return changed

    def make(self, *targets: str, quiet: bool = True, extra: list[str] | None = None,
             check: bool = True, what: str = "") -> subprocess.CompletedProcess:
        args = ["make", "-C", str(self.src), f"O={self.obj}", f"CC={self.compiler}",
                f"-j{self.jobs}", *(extra or []), *targets]
        if quiet:
            args.insert(1, "-s")
        proc = subprocess.run(args, capture_output=True, text=True)
        if check and proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise BuildFailed(f"{what or 'make ' + ' '.join(targets)} failed:\n{tail}")
        return proc

    def prepare(self) -> None:
        """Configure and prepare the object tree once per (tree, config); find vmlinux's objects."""
        stamp = self.obj / ".livesplice-prepared"
        if stamp.exists():
            return
        self.obj.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.config_path, self.obj / ".config")
        subprocess.run([str(self.src / "scripts" / "config"), "--file", str(self.obj / ".config"),
                        "--set-str", "SYSTEM_TRUSTED_KEYS", "", "--set-str",
                        "SYSTEM_REVOCATION_KEYS", "", "--set-str", "MODULE_SIG_KEY", ""], check=True)
        with console.status("make olddefconfig"):
            self.make("olddefconfig", what="make olddefconfig")
        self._check_config()
        with console.status("make prepare (about 10 s)"):
            self.make("prepare", what="make prepare")
        with console.status("asking kbuild which objects make up vmlinux (dry run)"):
            objects = self._vmlinux_objects()
        (self.obj / "livesplice-vmlinux-objects.json").write_text(json.dumps(sorted(objects)))
        stamp.touch()

    def _check_config(self) -> None:
        given = self.config
        result = parse_config(self.obj / ".config")
        differ = sorted(k for k in set(given) | set(result)
                        if given.get(k, "n") != result.get(k, "n") and k not in CONFIG_ALLOWED_DIFFS)
        if differ:
            shutil.rmtree(self.obj, ignore_errors=True)
            sample = ", ".join(f"{k}={given.get(k, 'n')}->{result.get(k, 'n')}" for k in differ[:6])
            raise BadInput(f"the config does not match the source tree: {len(differ)} options "
                           f"change under `make olddefconfig` ({sample})")

    def _vmlinux_objects(self) -> set[str]:
        # -W: every object depends on kconfig.h, so all of them are listed, built ones too (those
        # show as kbuild's delete-on-interrupt traps rather than as compiler commands).
        kconfig_h = self.src / "include" / "linux" / "kconfig.h"
        proc = self.make("vmlinux", quiet=False, check=False,
                         extra=["-n", "-k", "-W", str(kconfig_h), f"KCFLAGS={SECTION_FLAGS}"])
        objects = set(re.findall(r" -o (\S+\.o)(?=\s)", proc.stdout))
        objects |= set(re.findall(r"trap 'rm -f (\S+\.o);", proc.stdout))
        if len(objects) < 100:
            raise LivespliceError("kbuild's dry run of vmlinux listed almost no objects:\n"
                                  + proc.stderr[-2000:])
        return {o for o in objects if not o.startswith(NOT_KERNEL_TEXT)}

    @property
    def vmlinux_objects(self) -> set[str]:
        return set(json.loads((self.obj / "livesplice-vmlinux-objects.json").read_text()))

    # --- building objects ------------------------------------------------------------------------

    def build(self, objects: list[str]) -> None:
        """Build objects (paths relative to the tree, e.g. kernel/sys.o) in the object tree."""
        if not objects:
            return
        with console.status(f"compiling {len(objects)} object(s)") as status:
            for i in range(0, len(objects), 64):
                batch = objects[i:i + 64]
                status.update(f"compiling objects {i + 1}-{i + len(batch)} of {len(objects)}")
                self.make(*batch, extra=[f"KCFLAGS={SECTION_FLAGS}"],
                          what=f"compiling {', '.join(batch[:3])}{'...' if len(batch) > 3 else ''}")

    def deps(self, obj: str) -> set[str]:
        """The files an object was built from, per its .cmd file (relative to the source tree)."""
        cmd = self.obj / Path(obj).parent / f".{Path(obj).name}.cmd"
        if not cmd.exists():
            return set()
        out = set()
        prefix = str(self.src) + "/"
        for token in re.split(r"[\s\\]+", cmd.read_text(errors="replace")):
            if token.startswith(prefix):
                out.add(token[len(prefix):])
            elif token.startswith("$(wildcard"):
                continue
        return out

    def objects_for(self, changed: list[str]) -> tuple[list[str], list[str]]:
        """The vmlinux objects whose code may depend on the changed files, and the changed files
        that are not part of vmlinux at all (modules, tools, documentation, unconfigured code)."""
        vmlinux = self.vmlinux_objects
        by_source = {}
        for o in vmlinux:
            for ext in (".c", ".S"):
                by_source[o[:-2] + ext] = o
        wanted: set[str] = set()
        rest: list[str] = []
        others: list[str] = []
        for f in changed:
            if f in by_source:
                wanted.add(by_source[f])
            elif f.endswith((".c", ".h", ".S", ".inc", ".lds", ".asm")) and not f.startswith(
                    ("Documentation/", "tools/", "samples/", "scripts/")):
                rest.append(f)
            else:
                others.append(f)
        if rest:
            candidates = self._includers(rest, by_source)
            self.build(sorted(candidates - wanted))
            for o in candidates:
                if self.deps(o) & set(rest):
                    wanted.add(o)
            used = set().union(*(self.deps(o) for o in wanted)) if wanted else set()
            others += [f for f in rest if f not in used and f not in by_source]
        return sorted(wanted), others

    INCLUDE_DIRS = ("arch/x86/include", "arch/x86/include/uapi", "include", "include/uapi")

    def _includers(self, files: list[str], by_source: dict[str, str]) -> set[str]:
        """vmlinux objects whose sources may include any of `files`, directly or through headers:
        #include lines resolved like the compiler does (the file's own directory for "...", then
        the kernel's include directories), ignoring #if (an over-approximation that kbuild's
        dependency data then narrows)."""
        pattern = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
        resolved: dict[str, set[str]] = {}

        def includes(rel: str) -> set[str]:
            if rel in resolved:
                return resolved[rel]
            resolved[rel] = set()
            try:
                text = (self.src / rel).read_text(errors="replace")
            except OSError:
                return resolved[rel]
            out = set()
            for kind, name in pattern.findall(text):
                dirs = ([str(Path(rel).parent)] if kind == '"' else []) + list(self.INCLUDE_DIRS)
                for d in dirs:
                    candidate = os.path.normpath(os.path.join(d, name))
                    if (self.src / candidate).is_file():
                        out.add(candidate)
                        break
            resolved[rel] = out
            return out

        targets = set(files)
        memo: dict[str, bool] = {}

        def reaches(rel: str, stack: set[str]) -> bool:
            if rel in memo:
                return memo[rel]
            if rel in stack:
                return False
            stack.add(rel)
            hit = any(inc in targets or reaches(inc, stack) for inc in includes(rel))
            stack.discard(rel)
            memo[rel] = hit
            return hit

        return {obj for source, obj in by_source.items()
                if (self.src / source).exists() and reaches(source, set())}

    def is_module_object(self, obj: str) -> bool:
        cmd = self.obj / Path(obj).parent / f".{Path(obj).name}.cmd"
        return cmd.exists() and " -DMODULE " in cmd.read_text(errors="replace").split("\n", 1)[0]


class BuildFailed(BadInput):
    """The tree does not build with the patch (a compile error is the patch's or the tree's)."""


# --- patches -----------------------------------------------------------------------------------

def patch_files(patch: str) -> list[str]:
    """Files a unified diff (-p1) touches."""
    files = []
    for line in patch.splitlines():
        if line.startswith("+++ "):
            path = line[4:].split("\t")[0].strip()
            if path == "/dev/null":
                continue
            files.append(path.split("/", 1)[1] if "/" in path else path)
    deleted = []
    lines = patch.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("+++ /dev/null") and i > 0 and lines[i - 1].startswith("--- "):
            old = lines[i - 1][4:].split("\t")[0].strip()
            deleted.append(old.split("/", 1)[1] if "/" in old else old)
    return sorted(set(files + deleted))


def check_patch_applies(tree: Path, patch: str) -> None:
    proc = subprocess.run(["patch", "-p1", "--dry-run", "--batch", "--silent", "-d", str(tree)],
                          input=patch, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BadInput("the patch does not apply to the source tree:\n"
                       + (proc.stdout + proc.stderr).strip())


def apply_patch(tree: Path, patch: str) -> None:
    proc = subprocess.run(["patch", "-p1", "--batch", "--silent", "--no-backup-if-mismatch",
                           "-d", str(tree)], input=patch, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BadInput("the patch does not apply:\n" + (proc.stdout + proc.stderr).strip())


def file_patch(rel: str, old: str, new: str) -> str:
    """A -p1 unified diff of one file's text, as `diff -u a/REL b/REL` writes it."""
    import difflib
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                        f"a/{rel}", f"b/{rel}"))


def diffext_patch(source: Path, ext: str) -> str:
    """A -p1 unified diff from every FILE.c that has a sibling FILE.c+EXT (the article's --diffext)."""
    if not ext or "/" in ext:
        raise BadInput(f"--diffext {ext!r}: expected a file name suffix such as .new")
    pairs = []
    for new in sorted(source.rglob(f"*.c{ext}")):
        old = new.with_name(new.name[:-len(ext)])
        if old.is_file():
            pairs.append((old, new))
    if not pairs:
        raise BadInput(f"--diffext {ext}: no FILE.c with a sibling FILE.c{ext} under {source}")
    chunks = []
    for old, new in pairs:
        rel = old.relative_to(source)
        proc = subprocess.run(["diff", "-u", "--label", f"a/{rel}", "--label", f"b/{rel}",
                               str(old), str(new)], capture_output=True, text=True)
        if proc.returncode > 1:
            raise LivespliceError(f"diff failed on {rel}: {proc.stderr.strip()}")
        chunks.append(proc.stdout)
    return "".join(chunks)


@dataclass
class BuiltPair:
    objects: list[str]  # e.g. ["kernel/sys.o"]
    pre_dir: Path
    post_dir: Path
    not_in_vmlinux: list[str]


def build_pre_post(tree: WorkTree, patch: str, out: Path) -> BuiltPair:
    """Build the pre and post objects a patch needs, into out/pre and out/post."""
    files = patch_files(patch)
    check_patch_applies(tree.src, patch)
    objects, others = tree.objects_for(files)
    # Files the patch adds do not exist before it: find their objects once it is applied.
    pre_dir, post_dir = out / "pre", out / "post"
    tree.build(objects)
    _copy_objects(tree, objects, pre_dir)
    # Keep the pre state (sources with their times, objects with their .cmd files) so that it can
    # be put back exactly: make then sees the pre objects as up to date and reuses them next time.
    backups: dict[str, tuple[bytes, int] | None] = {}
    for f in files:
        p = tree.src / f
        backups[f] = (p.read_bytes(), p.stat().st_mtime_ns) if p.exists() else None
    saved = {o: [(p, p.read_bytes(), p.stat().st_mtime_ns) for p in _object_files(tree, o)]
             for o in objects}
    try:
        apply_patch(tree.src, patch)
        new_files = [f for f in files if backups[f] is None]
        if new_files:
            more, others2 = tree.objects_for(new_files)
            objects = sorted(set(objects) | set(more))
            others = [o for o in others if o not in new_files] + others2
        for o in objects:  # make must not take the pre object for an up-to-date post one
            (tree.obj / o).unlink(missing_ok=True)
        tree.build(objects)
        _copy_objects(tree, objects, post_dir)
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
    return BuiltPair(objects, pre_dir, post_dir, others)


def _object_files(tree: WorkTree, obj: str) -> list[Path]:
    o = tree.obj / obj
    return [p for p in (o, o.parent / f".{o.name}.cmd") if p.exists()]


def _copy_objects(tree: WorkTree, objects: list[str], dest: Path) -> None:
    for o in objects:
        target = dest / o
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree.obj / o, target)
