#!/usr/bin/env python3
"""create figures: a one-file .c fix from an unpacked but unprepared tree and again from the
prepared tree with cached pre objects; a one-line change in a widely included header.

Run as root after scripts/setup.sh:  .venv/bin/python bench/create.py [--header PATH]
"""

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from livesplice import debian
from livesplice.build import WorkTree, file_patch
from livesplice.create import create
from livesplice.errors import LivespliceError

DUMPABLE = "if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {"


def unified(tree: Path, rel: str, old: str, new: str) -> str:
    text = (tree / rel).read_text()
    assert text.count(old) == 1, (rel, old)
    return file_patch(rel, text, text.replace(old, new))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--header", default="include/linux/utsname.h",
                        help="header to change by one line (a #define is added at its end)")
    args = parser.parse_args()
    files = debian.fetch_kernel(debian.DEFAULT_KERNEL)
    work = Path(tempfile.mkdtemp(prefix="bench-create-", dir=debian.cache_root()))
    tree = work / "linux"
    try:
        # A tree livesplice has never seen: its own cache entry is made from nothing.
        subprocess.run(["cp", "-al", str(files.source_tree), str(tree)], check=True)
        fix = unified(tree, "kernel/sys.c", DUMPABLE,
                      "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")
        t = time.monotonic()
        create(tree, files.config, fix, "bench-cold", work / "a.tar.gz")
        cold = time.monotonic() - t
        t = time.monotonic()
        create(tree, files.config, fix, "bench-warm", work / "b.tar.gz")
        warm = time.monotonic() - t

        # One line in a header: every object that includes it is rebuilt, pre and post.
        text = (tree / args.header).read_text()
        last = text.rstrip("\n").rsplit("\n", 1)[-1] + "\n"
        patch = unified(tree, args.header, last, "#define LIVESPLICE_BENCH 1\n" + last) \
            if text.count(last) == 1 else None
        assert patch, f"{args.header}: its last line is not unique"
        wt = WorkTree(tree, files.config)
        t = time.monotonic()
        by_source = {o[:-2] + e: o for o in wt.vmlinux_objects for e in (".c", ".S")}
        candidates = len(wt._includers([args.header], by_source))
        users = wt.objects_for([args.header])[0]  # builds the pre objects of every candidate
        try:
            create(tree, files.config, patch, "bench-header", work / "c.tar.gz")
            outcome = "created"
        except LivespliceError as exc:
            outcome = f"{type(exc).__name__} (exit {exc.exit_status})"
        header_time = time.monotonic() - t
    finally:
        if tree.exists():
            shutil.rmtree(WorkTree(tree, files.config).root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.node()}, {os.cpu_count()} cpus; linux-source-6.1 "
          f"{files.kernel.version} with the stock {files.kernel.abi} config")
    print(f"one-file .c fix (kernel/sys.c), unpacked tree never prepared: {cold:.1f} s (target < 60 s)")
    print(f"the same, prepared tree and cached pre objects: {warm:.1f} s (target < 15 s)")
    print(f"one-line change in {args.header}: {candidates} vmlinux objects may include it (#include "
          f"lines), {len(users)} do (kbuild's dependency data); {header_time:.1f} s for pre and post "
          f"builds of those and the diff ({outcome})")


if __name__ == "__main__":
    main()
