"""Source patches: unified diffs (-p1), what they touch, applying them, and making them."""

from __future__ import annotations

import difflib
import re
import subprocess
from pathlib import Path

from .errors import BadInput, LivespliceError

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@")


def _strip_prefix(path: str) -> str:
    return path.split("/", 1)[1] if "/" in path else path


def patch_files(patch: str) -> list[str]:
    """Files a unified diff (-p1) touches, deleted ones included."""
    files = []
    lines = patch.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("+++ "):
            continue
        path = line[4:].split("\t")[0].strip()
        if path != "/dev/null":
            files.append(_strip_prefix(path))
        elif i > 0 and lines[i - 1].startswith("--- "):
            files.append(_strip_prefix(lines[i - 1][4:].split("\t")[0].strip()))
    return sorted(set(files))


def changed_lines(patch: str) -> dict[str, set[float]]:
    """For each file a unified diff changes, where in the file before the patch: the numbers
    (1-based) of the lines it removes, and for each place where it adds lines between lines L
    and L + 1, L + 0.5."""
    out: dict[str, set[float]] = {}
    current: set[float] | None = None
    old_line = 0
    for line in patch.splitlines():
        if line.startswith("--- "):
            current = None
        elif line.startswith("+++ "):
            path = line[4:].split("\t")[0].strip()
            current = out.setdefault(_strip_prefix(path), set()) if path != "/dev/null" else None
        elif (m := _HUNK.match(line)) and current is not None:
            old_line = int(m.group(1))
            # An empty old side (",0") names the line after which the new lines go.
            if m.group(2) == "0":
                old_line += 1
        elif current is None:
            continue
        elif line.startswith("-"):
            current.add(old_line)
            old_line += 1
        elif line.startswith("+"):
            current.add(old_line - 0.5)
        elif line.startswith(" "):
            old_line += 1
    return out


def check_patch_applies(tree: Path, patch: str) -> None:
    proc = subprocess.run(["patch", "-p1", "--dry-run", "--batch", "--silent", "-d", str(tree)],
                          input=patch, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BadInput("the patch does not apply to the source tree:\n"
                       + (proc.stdout + proc.stderr).strip())


def apply_patch(tree: Path, patch: str) -> None:
    proc = subprocess.run(["patch", "-p1", "--batch", "--silent", "--no-backup-if-mismatch",
                           "-d", str(tree)], input=patch, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise BadInput("the patch does not apply:\n" + (proc.stdout + proc.stderr).strip())


def file_patch(rel: str, old: str, new: str) -> str:
    """A -p1 unified diff of one file's text, as `diff -u a/REL b/REL` writes it."""
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
                               str(old), str(new)], capture_output=True, text=True, check=False)
        if proc.returncode > 1:
            raise LivespliceError(f"diff failed on {rel}: {proc.stderr.strip()}")
        chunks.append(proc.stdout)
    return "".join(chunks)
