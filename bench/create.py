#!/usr/bin/env python3
"""create figures, on linux-source-6.1 of the default stock kernel with its config:

1. a one-file .c fix from a tree livesplice has never seen, in an empty cache (the downloads
   aside): mirror, olddefconfig, prepare, kbuild's dry run, pre and post build, diff, modules;
2. the same again: prepared tree, cached pre objects;
3. then a second update of another file, given with --diffext (FILE.c.new beside FILE.c) in
   another copy of the tree, as the demo does after its --patch create;
4. one line added to a widely included header (every object that includes it is built, pre and
   post);
5. a member added to a struct of a widely included header: refused, and how many objects were
   compiled before the refusal;
6. a one-file fix in a large module (nf_tables: net/netfilter/nf_tables_api.c), first on the tree
   prepared for vmlinux (with kbuild's dry run of the modules, once per object tree), then again.

Run as root after scripts/setup.sh:  .venv/bin/python bench/create.py [--header PATH] [--skip-header]
"""

import argparse
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from livesplice import debian
from livesplice.build import WorkTree
from livesplice.create import create
from livesplice.errors import LivespliceError
from livesplice.patches import diffext_patch, file_patch

DUMPABLE = "if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {"
VERSION_SHOW = "static int version_proc_show(struct seq_file *m, void *v)\n{\n"
PRINTK = '\tprintk(KERN_INFO "livesplice bench: %s reads /proc/version\\n", current->comm);\n'
NFT_FILE = "net/netfilter/nf_tables_api.c"
NFT_LINE = "\terr = nf_tables_fill_gen_info(skb2, info->net, NETLINK_CB(skb).portid,\n"
STRUCT_HEADER = "include/linux/pipe_fs_i.h"
STRUCT_EDIT = ("struct pipe_inode_info {\n\tstruct mutex mutex;\n",
               "struct pipe_inode_info {\n\tstruct mutex mutex;\n\tunsigned long livesplice_bench;\n")
# What the cache keeps that a fresh one may share: the downloads and what is unpacked from them.
DOWNLOADS = ("debs", "kernels", "headers", "sources", "initramfs")


class CompiledObjects(logging.Handler):
    """Counts the objects the build asks make to compile (kbuild's log records)."""

    def __init__(self) -> None:
        super().__init__()
        self.objects: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.objects += getattr(record, "objects", [])


def unified(tree: Path, rel: str, old: str, new: str) -> str:
    text = (tree / rel).read_text()
    assert text.count(old) == 1, (rel, old)
    return file_patch(rel, text, text.replace(old, new))


def fresh_cache(shared: Path, where: Path) -> Path:
    """An empty cache that shares the downloads of `shared`: trees, object trees and the core
    module's build start from nothing."""
    where.mkdir()
    for name in DOWNLOADS:
        if (shared / name).exists():
            (where / name).symlink_to(shared / name)
    return where


def timed(fn, *args, **kwargs) -> tuple[float, str]:
    t = time.monotonic()
    try:
        fn(*args, **kwargs)
        outcome = "created"
    except LivespliceError as exc:
        outcome = f"{type(exc).__name__} (exit {exc.exit_status})"
    return time.monotonic() - t, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--header", default="include/linux/utsname.h",
                        help="header to change by one line (a #define is added at its end)")
    parser.add_argument("--skip-header", action="store_true", help="leave out figure 4")
    args = parser.parse_args()
    files = debian.fetch_kernel(debian.DEFAULT_KERNEL)
    shared = debian.cache_root()
    work = Path(tempfile.mkdtemp(prefix="bench-create-", dir=shared))
    os.environ["LIVESPLICE_CACHE"] = str(fresh_cache(shared, work / "cache"))
    counter = CompiledObjects()
    logging.getLogger("livesplice.kbuild").addHandler(counter)
    logging.getLogger("livesplice.kbuild").setLevel(logging.INFO)
    tree, other = work / "linux", work / "linux-debug"
    load_before = os.getloadavg()[0]
    lines = []
    try:
        # A tree livesplice has never seen: its own cache entry is made from nothing.
        subprocess.run(["cp", "-al", str(files.source_tree), str(tree)], check=True)
        fix = unified(tree, "kernel/sys.c", DUMPABLE,
                      "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {")
        cold, _ = timed(create, tree, files.config, fix, "bench-cold", work / "a.tar.gz")
        warm, _ = timed(create, tree, files.config, fix, "bench-warm", work / "b.tar.gz")
        lines += [(f"one-file .c fix (kernel/sys.c), unpacked tree never prepared, empty cache: "
                   f"{cold:.1f} s (target < 60 s)"),
                  f"the same, prepared tree and cached pre objects: {warm:.1f} s (target < 15 s)"]

        # The demo's second create: another copy of the tree, FILE.c.new beside FILE.c.
        subprocess.run(["cp", "-al", str(files.source_tree), str(other)], check=True)
        version_c = other / "fs" / "proc" / "version.c"
        (version_c.parent / "version.c.new").write_text(
            version_c.read_text().replace(VERSION_SHOW, VERSION_SHOW + PRINTK))
        second, outcome = timed(create, other, files.config, diffext_patch(other, ".new"),
                                "bench-diffext", work / "c.tar.gz")
        lines.append(f"then --diffext in another copy of the tree (a printk in "
                     f"fs/proc/version.c): {second:.1f} s ({outcome})")

        # A module's fix: the first needs kbuild's list of the modules' objects.
        fix = unified(tree, NFT_FILE, NFT_LINE, '\tasm volatile("nop");\n' + NFT_LINE)
        module_cold, outcome = timed(create, tree, files.config, fix, "bench-module-cold",
                                     work / "m1.tar.gz")
        module_warm, _ = timed(create, tree, files.config, fix, "bench-module-warm",
                               work / "m2.tar.gz")
        lines += [f"one-file fix in a module (nf_tables, {NFT_FILE}), tree prepared for vmlinux: "
                  f"{module_cold:.1f} s, with kbuild's dry run of the modules ({outcome})",
                  f"the same again (pre object cached): {module_warm:.1f} s"]

        wt = WorkTree(tree, files.config)
        if not args.skip_header:
            # One line in a header: every object that includes it is rebuilt, pre and post.
            text = (tree / args.header).read_text()
            last = text.rstrip("\n").rsplit("\n", 1)[-1] + "\n"
            assert text.count(last) == 1, f"{args.header}: its last line is not unique"
            patch = unified(tree, args.header, last, "#define LIVESPLICE_BENCH 1\n" + last)
            candidates = len(wt.deps.candidate_objects([args.header]))
            with wt.locked():
                users = wt.deps.objects_for([args.header])  # builds the pre objects of every candidate
            header_time, outcome = timed(create, tree, files.config, patch, "bench-header",
                                         work / "d.tar.gz")
            lines.append(f"one-line change in {args.header}: {candidates} objects may "
                         f"include it (#include lines), {len(users)} do (kbuild's dependency data); "
                         f"{header_time:.1f} s for pre and post builds of those and the diff ({outcome})")

        # A struct's layout changed in a header hundreds of objects include.
        patch = unified(tree, STRUCT_HEADER, *STRUCT_EDIT)
        includers = len(wt.deps.candidate_objects([STRUCT_HEADER]))
        counter.objects.clear()
        struct_time, outcome = timed(create, tree, files.config, patch, "bench-struct",
                                     work / "e.tar.gz")
        lines.append(f"a member added to struct pipe_inode_info ({STRUCT_HEADER}, {includers} "
                     f"objects may include it): {struct_time:.1f} s to {outcome}, "
                     f"{len(counter.objects)} object builds asked of make "
                     f"({len(set(counter.objects))} objects)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.node()}, {os.cpu_count()} cpus, load average {load_before:.1f} "
          f"before, {os.getloadavg()[0]:.1f} after; linux-source-6.1 {files.kernel.version} with "
          f"the stock {files.kernel.abi} config")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
