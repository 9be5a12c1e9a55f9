"""The main job, end to end, on a stock Debian kernel in the test bed.

1. A real stable fix between two Debian kernel sources, observable from user space: Linux 6.1.190's
   "prctl: PR_SET_MM_AUXV ..." change to prctl_set_auxv() copies the whole (zeroed) vector into
   mm->saved_auxv instead of only the bytes user space gave, so a short vector no longer leaves the
   old entries behind in /proc/PID/auxv. livesplice makes an update of it from the 6.1.187 tree,
   applies it to the running 6.1.187 kernel, shows the new behaviour, lists it, undoes it.
2. The article's debugging use: an update made with --diffext that adds a printk() to a running
   function (version_proc_show, behind /proc/version), seen in the kernel log, then undone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import debian
from .create import create
from .errors import LivespliceError
from .patches import diffext_patch, file_patch
from .testbed import Session

REPO = Path(__file__).resolve().parent.parent
FIX_FILE = "kernel/sys.c"
# Which Debian source carries the fix for which stock kernel.
FIXED_IN = {"6.1.187-1": "6.1.190-1"}

AUXV_PROBE = textwrap.dedent("""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MM, PR_SET_MM_AUXV = 35, 12
    entry = (ctypes.c_ulong * 2)(6, 4096)   # AT_PAGESZ 4096, of which only the type is given
    args = [ctypes.c_ulong(a) for a in (PR_SET_MM_AUXV, ctypes.addressof(entry), 8, 0)]
    if libc.prctl(PR_SET_MM, *args) != 0:
        raise SystemExit(f"prctl failed: errno {ctypes.get_errno()}")
    data = open("/proc/self/auxv", "rb").read()
    pairs = [(int.from_bytes(data[i:i + 8], "little"), int.from_bytes(data[i + 8:i + 16], "little"))
             for i in range(0, len(data), 16)]
    print(len(pairs) - 1)
""")


def fix_patch(old_tree: Path, new_tree: Path, rel: str) -> str:
    return file_patch(rel, (old_tree / rel).read_text(), (new_tree / rel).read_text())


class Demo:
    def __init__(self, kernel: str = debian.DEFAULT_KERNEL):
        self.kernel = debian.lookup_kernel(kernel)
        if self.kernel.version not in FIXED_IN:
            known = ", ".join(k.abi for k in debian.KNOWN_KERNELS.values() if k.version in FIXED_IN)
            raise LivespliceError(f"the demo's fix is known for {known}, not {kernel}")
        self.console = Console()
        self.timings: dict[str, float] = {}

    def step(self, text: str) -> None:
        self.console.rule(f"[bold]{text}")

    def timed(self, name: str, fn, *args, **kwargs):
        t = time.monotonic()
        with self.console.status(name):
            result = fn(*args, **kwargs)
        self.timings[name] = time.monotonic() - t
        return result

    def guest(self, vm: Session, *args: str, show: bool = True):
        r = vm.run([sys.executable, "-m", "livesplice", *args], timeout=600, cwd=str(REPO))
        if show:
            self.console.print(f"[dim]# livesplice {' '.join(Path(a).name if '/' in a else a for a in args)}")
            self.console.out(r.out.rstrip() or r.err.rstrip(), highlight=False)
        if r.status != 0:
            raise LivespliceError(f"livesplice {args[0]} failed in the guest ({r.status}): {r.err}")
        return r

    def auxv_entries(self, vm: Session) -> int:
        return int(vm.run(["python3", "-c", AUXV_PROBE], check=True).out)

    def run(self) -> None:
        kernel = self.kernel
        fixed_version = FIXED_IN[kernel.version]
        fixed = debian.kernel_for_source_version(fixed_version)
        self.step(f"fetching stock kernel {kernel.abi} and the sources of {kernel.version} and "
                  f"{fixed_version}")
        files = self.timed("fetch", debian.fetch_kernel, kernel.abi)
        fixed_files = debian.fetch_kernel(fixed.abi)
        work = debian.cache_root() / "demo"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)

        patch = fix_patch(files.source_tree, fixed_files.source_tree, FIX_FILE)
        (work / "auxv-fix.patch").write_text(patch)
        self.step(f"the fix: {FIX_FILE} from Debian {kernel.version} to {fixed_version}")
        self.console.out(patch, highlight=False)
        self.step("create: pre and post objects, the changed functions, the update package")
        fix = self.timed("create (fix)", create, files.source_tree, files.config, patch,
                         "auxv-fix", work / "auxv-fix.tar.gz")
        self.console.print(f"replaces: {', '.join(r.name for r in fix.package.manifest.replaced)}")

        # The debugging use: FILE.c.new beside FILE.c in a tree of the user's (hard links).
        tree = work / "linux"
        subprocess.run(["cp", "-al", str(files.source_tree), str(tree)], check=True)
        version_c = tree / "fs" / "proc" / "version.c"
        text = version_c.read_text()
        marker = "static int version_proc_show(struct seq_file *m, void *v)\n{\n"
        (version_c.parent / "version.c.new").write_text(text.replace(
            marker, marker + '\tprintk(KERN_INFO "livesplice demo: %s[%d] reads /proc/version\\n",'
                             ' current->comm, task_pid_nr(current));\n'))
        self.step("create --diffext .new: a printk in version_proc_show, for debugging")
        debug = self.timed("create (printk)", create, tree, files.config,
                           diffext_patch(tree, ".new"), "printk-debug", work / "printk-debug.tar.gz")

        self.step(f"booting {kernel.abi} in the VM")
        with Session(kernel=kernel.abi, rwdirs=[str(work)]) as vm:
            self.timings["boot"] = vm.boot_seconds or 0
            self.console.out(vm.run(["cat", "/proc/version"], check=True).out.strip())
            before = self.auxv_entries(vm)
            self.console.print(f"bug: after PR_SET_MM_AUXV with an 8-byte vector, /proc/self/auxv "
                               f"still lists {before} entries (the old ones are left behind)")
            self.step("apply")
            t = time.monotonic()
            r = self.guest(vm, "apply", str(fix.path), "--json")
            self.timings["apply (fix)"] = time.monotonic() - t
            applied = json.loads(r.out)
            after = self.auxv_entries(vm)
            self.console.print(f"fixed: /proc/self/auxv now lists {after} entry")
            self.guest(vm, "list")
            self.guest(vm, "view", "auxv-fix")
            self.step("undo")
            t = time.monotonic()
            self.guest(vm, "undo", "auxv-fix")
            self.timings["undo (fix)"] = time.monotonic() - t
            again = self.auxv_entries(vm)
            self.console.print(f"old behaviour again: {again} entries")

            self.step("debugging: apply the printk update, read /proc/version, undo")
            self.guest(vm, "apply", str(debug.path))
            vm.run(["cat", "/proc/version"], check=True)
            lines = [line for line in vm.dmesg().splitlines() if "livesplice demo:" in line]
            self.console.out("\n".join(lines[-2:]) or "(no printk line!)", highlight=False)
            self.guest(vm, "undo", "printk-debug")
            vm.run(["cat", "/proc/version"], check=True)
            lines_after = [line for line in vm.dmesg().splitlines()
                           if "livesplice demo:" in line]
            problems = vm.dmesg_problems()

        ok = (before > 1 and after == 1 and again == before and len(lines) >= 1
              and len(lines_after) == len(lines) and not problems)
        table = Table(title="livesplice demo: summary")
        table.add_column("step")
        table.add_column("result")
        table.add_row("kernel", f"{kernel.abi} (Debian {kernel.version}), stock, in QEMU/TCG")
        table.add_row("real fix", f"{FIX_FILE} {kernel.version} -> {fixed_version}: "
                                  f"{', '.join(r.name for r in fix.package.manifest.replaced)}")
        table.add_row("auxv entries", f"before {before}, applied {after}, undone {again}")
        table.add_row("machine stopped", f"{applied['pause_ns'] / 1e6:.3f} ms")
        table.add_row("printk update", f"{len(lines)} log line(s) while applied, "
                                       f"{len(lines_after) - len(lines)} after undo")
        table.add_row("kernel log", "clean" if not problems else "; ".join(problems[:3]))
        for name, seconds in self.timings.items():
            table.add_row(f"time: {name}", f"{seconds:.1f} s")
        self.console.print(table)
        shutil.rmtree(tree, ignore_errors=True)
        if not ok:
            raise LivespliceError("the demo did not behave as expected (see the summary)")
