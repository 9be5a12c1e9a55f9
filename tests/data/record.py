"""Record, once, what run-pre matching reads from the real stock kernel, for the fast tests
(tests/test_runpre.py). See tests/data/README.md.

On the host: make an update package with the real `livesplice create` (two functions of
kernel/sys.c changed), boot the stock kernel in the test bed, and run this script's guest part
there. The guest part runs run-pre matching (livesplice.runpre.Matcher) on the package's pre code
against the running kernel's /proc/kallsyms and /proc/kcore, noting every symbol it looks up and
every range of kernel memory it reads, and writes those (and what it found) out. The host keeps
them with the package's manifest.json and pre.json, as create wrote them.

    PYTHONPATH=$PWD .venv/bin/python tests/data/record.py [--kernel ABI] [-o tests/data/prctl]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from livesplice import debian
from livesplice.kernel import Kallsyms, KernelMemory, KSym, running_build_id
from livesplice.patches import file_patch

REPO = Path(__file__).resolve().parents[2]

# The change recorded: prctl's PR_SET_DUMPABLE also rejects a stray third argument (the article's
# Listing 1, test_apply.PRCTL_A) and PR_SET_MM_AUXV an empty vector (test_apply's auxv update).
# __do_sys_prctl (1.7 KiB, no fentry site, refers to static functions that only matching can
# place) and prctl_set_auxv (an fentry site, calls through the return thunk) are replaced.
EDITS = [
    ("if (arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) {",
     "if ((arg2 != SUID_DUMP_DISABLE && arg2 != SUID_DUMP_USER) || arg3) {"),
    ("\tif (len > sizeof(user_auxv))\n\t\treturn -EINVAL;",
     "\tif (!len || len > sizeof(user_auxv))\n\t\treturn -EINVAL;"),
]
SOURCE_FILE = "kernel/sys.c"
UPDATE_ID = "recorded"
OUT = Path(__file__).resolve().parent / "prctl"


class RecordingKallsyms(Kallsyms):
    """/proc/kallsyms, noting each name looked up."""

    def __init__(self, text: str):
        super().__init__(text)
        self.consulted: set[str] = set()

    def lookup(self, name: str, module: str | None = None) -> list[KSym]:
        self.consulted.add(name)
        return super().lookup(name, module)


class RecordingMemory:
    """/proc/kcore, noting each range read."""

    def __init__(self, memory: KernelMemory):
        self.memory = memory
        self.reads: list[tuple[int, bytes]] = []

    def read(self, address: int, size: int) -> bytes:
        data = self.memory.read(address, size)
        self.reads.append((address, data))
        return data


def merged(reads: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Overlapping or adjacent reads as one range each."""
    ranges: list[tuple[int, bytearray]] = []
    for address, data in sorted(reads):
        if ranges and address <= ranges[-1][0] + len(ranges[-1][1]):
            start, have = ranges[-1]
            if address + len(data) > start + len(have):  # the bytes both hold are the same
                have[address - start:] = data
        else:
            ranges.append((address, bytearray(data)))
    return [(a, bytes(d)) for a, d in ranges]


def record_in_guest(package_path: Path, out: Path) -> None:
    from livesplice.package import Package
    from livesplice.runpre import Matcher

    package = Package.read(package_path)
    text = Path("/proc/kallsyms").read_text()
    kallsyms = RecordingKallsyms(text)
    memory = RecordingMemory(KernelMemory())
    matcher = Matcher(kallsyms, memory, [])  # type: ignore[arg-type]  # duck-typed recorder
    match = matcher.match(package.pre.functions)
    resolved = {ref.placeholder: matcher.resolve(ref, match) for ref in package.manifest.kernel_refs}
    # Kallsyms needs _stext (with an address: root's view) besides the names matching consulted.
    wanted = kallsyms.consulted | {"_stext"}
    excerpt = [line for line in text.splitlines() if line.split()[2] in wanted]
    (out / "kallsyms").write_text("\n".join(excerpt) + "\n")
    (out / "kcore.json").write_text(json.dumps({"ranges": [
        {"address": f"{a:#x}", "bytes": base64.b64encode(d).decode()}
        for a, d in merged(memory.reads)]}, indent=1) + "\n")
    (out / "matched.json").write_text(json.dumps({
        "kernel": {"release": os.uname().release, "build_id": running_build_id(),
                   "version": Path("/proc/version").read_text().strip()},
        "functions": [{"object": f.object, "name": f.name, "original": f"{f.original:#x}",
                       "live": f"{f.live:#x}", "size": f.size, "site": f"{f.site:#x}",
                       "expect": f.expect.hex()} for f in match.functions.values()],
        "bindings": [{"object": obj, "name": name, "address": f"{address:#x}"}
                     for (obj, name), address in sorted(match.bindings.items())],
        "resolved": {placeholder: None if address is None else f"{address:#x}"
                     for placeholder, address in resolved.items()},
    }, indent=1) + "\n")


def record(abi: str, out: Path) -> None:
    from livesplice.testbed import Session

    files = debian.fetch_kernel(abi)
    text = (files.source_tree / SOURCE_FILE).read_text()
    new = text
    for old, replacement in EDITS:
        assert new.count(old) == 1, f"{SOURCE_FILE}: {old!r} occurs {new.count(old)} times"
        new = new.replace(old, replacement)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="livesplice-record-") as tmp:
        exchange = Path(tmp)
        (exchange / "fix.patch").write_text(file_patch(SOURCE_FILE, text, new))
        package = exchange / f"{UPDATE_ID}.tar.gz"
        subprocess.run([sys.executable, "-m", "livesplice", "create", "--source",
                        str(files.source_tree), "--config", str(files.config), "--patch",
                        str(exchange / "fix.patch"), "--id", UPDATE_ID, "-o", str(package)],
                       check=True, cwd=REPO)
        with tarfile.open(package) as tar:
            for member in ("manifest.json", "pre.json"):
                extracted = tar.extractfile(member)
                assert extracted is not None
                (out / member).write_bytes(extracted.read())
        with Session(kernel=abi, rwdirs=[str(exchange)]) as vm:
            result = vm.run([sys.executable, str(Path(__file__).resolve()), "--guest", str(package),
                             str(exchange)], timeout=600, cwd=str(REPO),
                            env={"PYTHONPATH": str(REPO)})
            if result.status != 0:
                sys.exit(f"recording in the guest failed ({result.status}):\n{result.err}")
            problems = vm.dmesg_problems()
            if problems:
                sys.exit("the guest's kernel log reports problems:\n" + "\n".join(problems))
        for name in ("kallsyms", "kcore.json", "matched.json"):
            (out / name).write_bytes((exchange / name).read_bytes())
    print(f"recorded into {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", default=debian.DEFAULT_KERNEL)
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    parser.add_argument("--guest", nargs=2, metavar=("PACKAGE", "OUTDIR"), type=Path,
                        help=argparse.SUPPRESS)  # the part that runs in the test bed
    args = parser.parse_args()
    if args.guest:
        record_in_guest(*args.guest)
    else:
        record(args.kernel, args.out)


if __name__ == "__main__":
    main()
