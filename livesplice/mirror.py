"""The source mirror: a cached copy of a kernel source tree, so that the user's tree is never written.

One mirror per kernel version (the top Makefile's VERSION.PATCHLEVEL.SUBLEVEL EXTRAVERSION), not
per path: another tree of the same kernel (a hard-linked copy with FILE.c.new files beside, a
second checkout) is synced into the same mirror, and only the files that differ are copied, so
its object trees and their pre objects serve every such tree.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from . import debian
from .errors import BadInput, LivespliceError
from .kconfig import kernel_version

MIRROR_EXCLUDES = [".config", ".config.old", "/include/config/", "/include/generated/",
                   "/arch/*/include/generated/", "*.o", "*.ko", "*.a", ".*.cmd", ".*.d",
                   "/.git/", "/livesplice/"]

console = Console(stderr=True)


class SourceMirror:
    """src/ under the cache's trees/linux-VERSION/, synced from a source tree with rsync."""

    def __init__(self, source: Path):
        self.source = source.resolve()
        if not (self.source / "Makefile").is_file() or not (self.source / "kernel").is_dir():
            raise BadInput(f"{self.source} is not a kernel source tree (no Makefile and kernel/)")
        self.root = debian.cache_root() / "trees" / f"linux-{kernel_version(self.source)}"
        self.src = self.root / "src"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the mirror (and the object trees beside it) for one command at a time."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def sync(self) -> list[str]:
        """Mirror the source into src/; return the paths that changed (their mtimes set to now,
        so that make rebuilds what depends on them even if the source file's time is older)."""
        self.src.mkdir(parents=True, exist_ok=True)
        args = ["rsync", "-a", "--delete", "--out-format=%n"]
        for ex in MIRROR_EXCLUDES:
            args += ["--exclude", ex]
        with console.status(f"mirroring {self.source} into the cache"):
            out = subprocess.run(args + [f"{self.source}/", f"{self.src}/"], capture_output=True,
                                 text=True, check=False)
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
