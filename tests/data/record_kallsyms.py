#!/usr/bin/env python3
"""Print the excerpt of /proc/kallsyms (or of FILE) that tests/test_kallsyms.py reads: the lines
it needs, in the kernel's order. See README.md here for how it was recorded."""

import sys
from collections import Counter

WINDOW = 300  # lines each side of __do_sys_prctl: neighbours for next_text_after
MODULES = ("virtio_console", "9pnet_virtio", "virtio")  # small modules loaded in the test bed
MAX_COPIES = 12  # names with more lines than this (__func__.0: hundreds) are not all kept


def fields(line: str) -> tuple[str, str | None]:
    name_part, _, module = line.partition("\t")
    return name_part.split()[2], module.strip("[]") or None


def excerpt(lines: list[str]) -> list[str]:
    parsed = [fields(line) for line in lines]
    names = [name for name, _ in parsed]
    keep = set(range(names.index("_stext") + 16))  # percpu symbols at 0, then the start of text
    prctl = names.index("__do_sys_prctl")
    keep |= set(range(prctl - WINDOW, prctl + WINDOW + 1))
    keep |= {i for i, (_, module) in enumerate(parsed) if module in MODULES}
    copies = Counter(names)
    wanted = {names[i] for i in keep if copies[names[i]] <= MAX_COPIES}
    wanted |= {"__ksymtab_" + name for name in wanted}
    keep |= {i for i, name in enumerate(names) if name in wanted}
    return [lines[i] for i in sorted(keep)]


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "/proc/kallsyms"
    with open(path) as f:
        lines = f.read().splitlines()
    sys.stdout.write("".join(line + "\n" for line in excerpt(lines)))


if __name__ == "__main__":
    main()
