"""Running kbuild: make in the mirrored tree with an object tree per config, and which objects of
that tree make up vmlinux.

Objects are built out of tree (`make O=`) with `-ffunction-sections -fdata-sections`. A make that
fails leaves its whole output in a log file under the cache's logs/ (as kpatch-build keeps
~/.kpatch/build.log), which the error names; the error itself shows the last lines.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from rich.console import Console

from . import debian
from .errors import BadInput, LivespliceError
from .kconfig import KernelConfig

SECTION_FLAGS = "-ffunction-sections -fdata-sections"
# The patch author's header (livesplice.h: shadow data, hooks). Every build (pre, post, probes)
# has it on its include path: a stacked update's pre source is an older update's post source.
AUTHOR_INCLUDE = Path(__file__).resolve().parent / "data" / "include"
# Objects kbuild builds for vmlinux that are not kernel text livesplice could redirect: host tools,
# the vDSO (mapped into user space), real-mode and boot code.
NOT_KERNEL_TEXT = ("scripts/", "tools/", ".tmp", "arch/x86/entry/vdso/", "arch/x86/realmode/",
                   "arch/x86/boot/", "usr/")
# Objects per make call: a bounded command line, and progress to show between calls.
BATCH = 64

console = Console(stderr=True)
log = logging.getLogger(__name__)


class BuildFailed(BadInput):
    """The tree does not build with the patch (a compile error is the patch's or the tree's)."""


def log_dir() -> Path:
    return debian.cache_root() / "logs"


def keep_build_log(name: str, command: list[str], output: str) -> Path:
    """Write a failed build's whole output to logs/NAME-TIME.log; return the file's path."""
    directory = log_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.write_text(f"$ {shlex.join(command)}\n{output}")
    return path


def run_make(args: list[str], what: str, log_name: str,
             error: type[LivespliceError] = LivespliceError) -> subprocess.CompletedProcess:
    """Run make; if it fails, raise `error` with the last lines, naming the log of all of it."""
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        path = keep_build_log(log_name, args, output)
        tail = "\n".join(output.strip().splitlines()[-25:])
        raise error(f"{what} failed:\n{tail}\n(the whole make output is in {path})")
    return proc


class Kbuild:
    """make in a source tree `src` with objects in `obj`, with the config's compiler."""

    def __init__(self, src: Path, obj: Path, compiler: str, jobs: int, log_name: str = "build",
                 variables: list[str] | None = None):
        self.src, self.obj, self.compiler, self.jobs = src, obj, compiler, jobs
        self.log_name = log_name  # logs/LOG_NAME-TIME.log holds a failed make's output
        self.variables = variables or []  # more of make's VAR=VALUE (KernelConfig.make_variables)

    def command(self, *targets: str, quiet: bool = True, extra: list[str] | None = None) -> list[str]:
        return ["make", *(["-s"] if quiet else []), "-C", str(self.src), f"O={self.obj}",
                f"CC={self.compiler}", *self.variables, f"-j{self.jobs}", *(extra or []),
                *targets]

    @functools.cached_property
    def kcflags(self) -> str:
        """KCFLAGS of every build: function and data sections, and the author's headers, copied
        into the object tree once per Kbuild (a path that does not move with the checkout, so
        that a build from another clone reuses the objects; rewritten only when they change)."""
        include = self.obj / "livesplice-include"
        include.mkdir(parents=True, exist_ok=True)
        for header in AUTHOR_INCLUDE.iterdir():
            copy = include / header.name
            if not copy.exists() or copy.read_bytes() != header.read_bytes():
                shutil.copyfile(header, copy)
        if any(c.isspace() for c in str(include)):
            raise BadInput(f"the object tree's path has white space, which make's KCFLAGS cannot "
                           f"carry: {include}; set LIVESPLICE_CACHE to a path without any")
        return f"{SECTION_FLAGS} -I{include}"

    def make(self, *targets: str, what: str = "", extra: list[str] | None = None) -> None:
        run_make(self.command(*targets, extra=extra), what or f"make {' '.join(targets)}",
                 self.log_name, BuildFailed)

    def dry_run(self, *targets: str, extra: list[str]) -> subprocess.CompletedProcess:
        """make -n (it may fail: the caller reads what it printed)."""
        return subprocess.run(self.command(*targets, quiet=False, extra=["-n", *extra]),
                              capture_output=True, text=True, check=False)

    def build(self, objects: list[str]) -> None:
        """Build objects (paths relative to the tree, e.g. kernel/sys.o) in the object tree."""
        if not objects:
            return
        log.info("compiling %d object(s): %s", len(objects), " ".join(objects),
                 extra={"objects": list(objects)})
        with console.status(f"compiling {len(objects)} object(s)") as status:
            for i in range(0, len(objects), BATCH):
                batch = objects[i:i + BATCH]
                status.update(f"compiling objects {i + 1}-{i + len(batch)} of {len(objects)}")
                self.make(*batch, extra=[f"KCFLAGS={self.kcflags}"],
                          what=f"compiling {', '.join(batch[:3])}{'...' if len(batch) > 3 else ''}")


class ObjectTree:
    """The object tree of one config (obj-HASH/ beside the mirror): configured and prepared
    once, with the list of objects kbuild links into vmlinux."""

    OBJECT_LIST = "livesplice-vmlinux-objects.json"

    def __init__(self, kbuild: Kbuild, config: KernelConfig):
        self.kbuild, self.config = kbuild, config
        self.obj = kbuild.obj

    def prepare(self) -> None:
        """Configure and prepare the object tree once per (tree, config); find vmlinux's objects."""
        stamp = self.obj / ".livesplice-prepared"
        if stamp.exists():
            return
        self.obj.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.config.path, self.obj / ".config")
        subprocess.run([str(self.kbuild.src / "scripts" / "config"), "--file", str(self.obj / ".config"),
                        "--set-str", "SYSTEM_TRUSTED_KEYS", "", "--set-str",
                        "SYSTEM_REVOCATION_KEYS", "", "--set-str", "MODULE_SIG_KEY", ""], check=True)
        with console.status("make olddefconfig"):
            self.kbuild.make("olddefconfig", what="make olddefconfig")
        try:
            self.config.check_olddefconfig_result(self.obj / ".config")
        except BadInput:
            shutil.rmtree(self.obj, ignore_errors=True)
            raise
        with console.status("make prepare (about 10 s)"):
            self.kbuild.make("prepare", what="make prepare")
        with console.status("asking kbuild which objects make up vmlinux (dry run)"):
            objects = self._dry_run_objects()
        (self.obj / self.OBJECT_LIST).write_text(json.dumps(sorted(objects)))
        stamp.touch()

    def _dry_run_objects(self) -> set[str]:
        # -W: every object depends on kconfig.h, so all of them are listed, built ones too (those
        # show as kbuild's delete-on-interrupt traps rather than as compiler commands).
        kconfig_h = self.kbuild.src / "include" / "linux" / "kconfig.h"
        proc = self.kbuild.dry_run("vmlinux", extra=["-k", "-W", str(kconfig_h),
                                                     f"KCFLAGS={self.kbuild.kcflags}"])
        objects = set(re.findall(r" -o (\S+\.o)(?=\s)", proc.stdout))
        objects |= set(re.findall(r"trap 'rm -f (\S+\.o);", proc.stdout))
        if len(objects) < 100:
            raise LivespliceError("kbuild's dry run of vmlinux listed almost no objects:\n"
                                  + proc.stderr[-2000:])
        return {o for o in objects if not o.startswith(NOT_KERNEL_TEXT)}

    @property
    def vmlinux_objects(self) -> set[str]:
        return set(json.loads((self.obj / self.OBJECT_LIST).read_text()))

    MODULE_LIST = "livesplice-module-objects.json"
    # kbuild writes each module's object list into MODULE.mod with this command
    _MOD_FILE = re.compile(r"""printf '%s\\n'\s+([^|']*?)\s*\| awk '!x\[\$0\]\+\+ """
                           r"""\{ print\("([^"]*)"\$0\) \}' > (\S+)\.mod;""")

    def module_objects(self) -> dict[str, str]:
        """Object -> the module kbuild links it into, as the module's path without .ko
        (fs/ext4/ioctl.o -> fs/ext4/ext4), for this config: from a dry run of `make modules`
        (about a minute), once per object tree."""
        cached = self.obj / self.MODULE_LIST
        if cached.exists():
            return json.loads(cached.read_text())
        kconfig_h = self.kbuild.src / "include" / "linux" / "kconfig.h"
        with console.status("asking kbuild which objects make up each module (dry run, about "
                            "a minute once)"):
            proc = self.kbuild.dry_run("modules", extra=["-k", "-W", str(kconfig_h),
                                                         f"KCFLAGS={self.kbuild.kcflags}"])
        out: dict[str, str] = {}
        for objects, prefix, module in self._MOD_FILE.findall(proc.stdout):
            for o in objects.split():
                out.setdefault(prefix + o, module)
        if len(set(out.values())) < 10 and self.config.options.get("CONFIG_MODULES") == "y":
            raise LivespliceError("kbuild's dry run of the modules listed almost none:\n"
                                  + proc.stderr[-2000:])
        cached.write_text(json.dumps(out, sort_keys=True))
        return out

    # scripts/Makefile.lib: objtool-args-$(CONFIG_X) += ARGS, or $(or $(CONFIG_X),$(CONFIG_Y))
    _OBJTOOL_ARG = re.compile(r"^objtool-args-\$\((?:CONFIG_(\w+)|or ((?:\$\(CONFIG_\w+\),?)+))\)"
                              r"\s*\+=\s*(.+?)\s*$", re.MULTILINE)

    @functools.cached_property
    def delayed_objtool(self) -> bool:
        """Whether kbuild runs objtool on vmlinux.o and on linked modules only, not on each
        object (scripts/Makefile.lib's delay-objtool: IBT, as in the 6.12 line, or clang LTO).
        Then the objects make leaves have none of what objtool adds (ORC, the return, retpoline
        and call sites, static call sites, prefix symbols) nor its changes (jump label NOPs)."""
        opts = self.config.options
        return opts.get("CONFIG_OBJTOOL") == "y" and (
            opts.get("CONFIG_X86_KERNEL_IBT") == "y" or opts.get("CONFIG_LTO_CLANG") == "y")

    def objtool_args(self) -> list[str]:
        """objtool-args-y of the tree's scripts/Makefile.lib for this config (what kbuild passes
        objtool on vmlinux.o, but for --link)."""
        text = (self.kbuild.src / "scripts" / "Makefile.lib").read_text()
        opts = self.config.options
        args: list[str] = []
        for single, alternatives, value in self._OBJTOOL_ARG.findall(text):
            names = [single] if single else re.findall(r"CONFIG_(\w+)", alternatives)
            if not any(opts.get(f"CONFIG_{n}") == "y" for n in names):
                continue
            if value == "--mnop":
                continue
            value = re.sub(r"\$\(CONFIG_(\w+)\)", lambda m: opts.get(f"CONFIG_{m[1]}", ""), value)
            if "$" in value:
                raise LivespliceError(f"scripts/Makefile.lib: objtool argument {value!r} not understood")
            args += value.split()
        if opts.get("CONFIG_FTRACE_MCOUNT_USE_OBJTOOL") == "y" and \
                opts.get("CONFIG_HAVE_OBJTOOL_NOP_MCOUNT") == "y":
            args.append("--mnop")  # (ifdef'd in the Makefile)
        return args

    def run_delayed_objtool(self, path: Path, obj: str, module: bool) -> None:
        """Run objtool on a copy of object `obj` (at `path`) as kbuild runs it on vmlinux.o or on
        the module linked from it, where kbuild delays objtool (`delayed_objtool`); nothing if
        the object has objtool's output already (a module of a single object)."""
        if not self.delayed_objtool or _has_section(path, ".orc_unwind_ip"):
            return
        objtool = self.obj / "tools" / "objtool" / "objtool"
        if not objtool.exists():
            raise LivespliceError(f"objtool is not built in {self.obj} (make prepare builds it)")
        command = [str(objtool), *self.objtool_args(), "--link",
                   *(["--module"] if module else []), str(path)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            where = keep_build_log(self.kbuild.log_name, command, proc.stdout + proc.stderr)
            raise LivespliceError(f"objtool failed on {obj} (as kbuild runs it on vmlinux.o): "
                                  f"{proc.stderr.strip()[-2000:]} (in full: {where})")
        if proc.stderr.strip():
            log.debug("objtool on %s: %s", obj, proc.stderr.strip())

    def cmd_file(self, obj: str) -> Path:
        """kbuild's record of how an object was built (command line, then its dependencies)."""
        return self.obj / Path(obj).parent / f".{Path(obj).name}.cmd"


def _has_section(path: Path, name: str) -> bool:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        return ELFFile(f).get_section_by_name(name) is not None
