#!/usr/bin/env python3
"""apply figures, in the VM on the stock kernel: the machine's pause for a 1-function and a
20-function update next to an empty stop_machine() in the same run, and the whole apply time with
run-pre matching's share.

Run as root after scripts/setup.sh:  .venv/bin/python bench/apply.py [--runs N]
"""

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from livesplice import debian
from livesplice.build import file_patch
from livesplice.create import create
from livesplice.testbed import Session

REPO = Path(__file__).resolve().parent.parent
DUMPABLE = "if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {"


def one_function_patch(tree: Path) -> str:
    return unified(tree, "kernel/sys.c", lambda t: t.replace(
        DUMPABLE, "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {"))


def many_functions_patch(tree: Path, syscalls: int) -> str:
    """A nop at the top of the first `syscalls` system calls of kernel/sys.c (each one is a
    __do_sys_ function, or is inlined into its __x64_ and __ia32_ entry points)."""
    def edit(text: str) -> str:
        count = 0

        def add_nop(m):
            nonlocal count
            count += 1
            return m.group(0) + ('\tasm volatile("nop");\n' if count <= syscalls else "")
        return re.sub(r"^SYSCALL_DEFINE\d\([^;{]*\)\n\{\n", add_nop, text, flags=re.M)
    return unified(tree, "kernel/sys.c", edit)


def unified(tree: Path, rel: str, edit) -> str:
    text = (tree / rel).read_text()
    return file_patch(rel, text, edit(text))


GUEST = textwrap.dedent("""
    import json, sys, time
    from livesplice.apply import apply, undo, empty_pause
    out = {"empty": [], "one": [], "many": []}
    runs = int(sys.argv[3])
    for _ in range(runs):
        out["empty"].append(empty_pause(sys.argv[1], 20))
        for key, path in (("one", sys.argv[1]), ("many", sys.argv[2])):
            r = apply(path)
            out[key].append(r)
            undo(r["id"])
    print(json.dumps(out))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--syscalls", type=int, default=12)
    args = parser.parse_args()
    files = debian.fetch_kernel(debian.DEFAULT_KERNEL)
    exchange = Path(tempfile.mkdtemp(prefix="bench-apply-", dir=debian.cache_root()))
    one = create(files.source_tree, files.config, one_function_patch(files.source_tree),
                 "bench-one", exchange / "one.tar.gz")
    many = create(files.source_tree, files.config,
                  many_functions_patch(files.source_tree, args.syscalls), "bench-many",
                  exchange / "many.tar.gz")
    n_many = len(many.package.manifest.replaced)
    with Session(rwdirs=[str(exchange)]) as vm:
        r = vm.run([sys.executable, "-c", GUEST, str(one.path), str(many.path), str(args.runs)],
                   timeout=3600, cwd=str(REPO), check=True)
        problems = vm.dmesg_problems()
    data = json.loads(r.out)
    ms = lambda ns: ns / 1e6
    empty = statistics.median(e["mean_ns"] for e in data["empty"])
    print(f"machine: {platform.node()}, {__import__('os').cpu_count()} cpus; guest {debian.DEFAULT_KERNEL} "
          f"under QEMU/TCG, 2 vCPUs; {args.runs} runs each, medians")
    print(f"empty stop_machine pause: {ms(empty):.3f} ms")
    for key, label in (("one", "1-function update"), ("many", f"{n_many}-function update")):
        rs = data[key]
        pause = statistics.median(x["pause_ns"] for x in rs)
        work = statistics.median(x["work_ns"] for x in rs)
        total = statistics.median(x["total_seconds"] for x in rs)
        match = statistics.median(x["match_seconds"] for x in rs)
        print(f"{label}: pause {ms(pause):.3f} ms (stack check and writes {ms(work):.3f} ms); "
              f"whole apply {total:.2f} s, of which run-pre matching {match:.2f} s "
              f"({100 * match / total:.0f}%)")
    print(f"kernel log problems: {len(problems)}")


if __name__ == "__main__":
    main()
