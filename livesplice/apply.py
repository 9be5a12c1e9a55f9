"""`apply`, `undo`, `list`, `view`, `cleanup`: switch the running kernel to an update's code, and back.

apply: check the package and that it targets this kernel; match its pre code against the running
kernel (runpre); load the core module if needed and the new code with its kernel references set to
the addresses matching found; then ask the core to switch, with every CPU stopped, when no thread
is in the code being replaced. On any failure everything loaded for this apply is unloaded again.
What is applied is the core's state, so `list` is right even after the tool crashed; the manifests
kept in /run (gone at reboot, like the updates themselves) add the patch text. Commands that change
or read the updates hold one lock, so two of them never interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import time
from pathlib import Path

from . import coreproto, kernel
from .errors import BadInput, NothingToDo, Refused
from .package import CORE_MODULE as CORE_MEMBER
from .package import Package
from .runpre import Matcher, MatchResult

STATE_DIR = Path(os.environ.get("LIVESPLICE_STATE", "/run/livesplice"))
SKIP_TARGET_CHECK = "LIVESPLICE_UNSAFE_SKIP_TARGET_CHECK"  # tests only: reach run-pre matching
UPDATE_MODULE_PREFIX = "livesplice_"


@contextlib.contextmanager
def locked():
    """One livesplice command at a time changes or reads the kernel's updates. The lock is an
    flock on a file in /run, so a killed command releases it."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _leftover_modules(applied: list[coreproto.AppliedUpdate]) -> list[str]:
    """Update modules loaded but not applied: what a killed apply left behind."""
    in_use = {u.module for u in applied}
    return [d.name for d in sorted(Path("/sys/module").glob(UPDATE_MODULE_PREFIX + "*"))
            if d.name != coreproto.CORE_MODULE and d.name not in in_use
            and (d / "sections").is_dir()]


def cleanup() -> list[str]:
    """Unload what a killed command left loaded but not switched: update modules the core does
    not know as applied, and an idle core. Call with the lock held; returns what was unloaded."""
    removed = []
    for name in _leftover_modules(coreproto.state()):
        kernel.rmmod(name)
        removed.append(name)
    if _unload_core_if_idle():
        removed.append(coreproto.CORE_MODULE)
    return removed


def check_lockdown() -> None:
    """livesplice's modules are not signed with a key the kernel trusts: where the kernel insists
    on signatures, refuse before loading anything."""
    security = Path("/sys/kernel/security")
    if not os.path.ismount(security):
        subprocess.run(["mount", "-t", "securityfs", "securityfs", str(security)],
                       capture_output=True)
    lockdown = security / "lockdown"
    if lockdown.exists():
        mode = re.search(r"\[(\w+)\]", lockdown.read_text())
        if mode and mode.group(1) != "none":
            raise Refused(f"the kernel is locked down ({mode.group(1)}): it loads only modules "
                          "signed with a trusted key, and livesplice's are not; nothing was changed")
    enforce = Path("/sys/module/module/parameters/sig_enforce")
    if enforce.exists() and enforce.read_text().strip() == "Y":
        raise Refused("the kernel enforces module signatures (module.sig_enforce): it loads only "
                      "modules signed with a trusted key, and livesplice's are not; nothing was "
                      "changed")


def check_target(package: Package) -> None:
    """That the package is for this very kernel: the same build id (the GNU build-id note of
    vmlinux, which /sys/kernel/notes shows); the release only names it. A package without a build
    id (made for a self-built kernel whose vmlinux was not at hand) is checked by its release and
    version banner against /proc/version, whose text an applied update may have changed."""
    target = package.manifest.kernel
    if os.environ.get(SKIP_TARGET_CHECK) == "1":
        return
    release = kernel.running_release()
    wanted = target.build_id
    if wanted is not None:
        if not (isinstance(wanted, str) and re.fullmatch(r"[0-9a-fA-F]{2,}", wanted)):
            raise BadInput(f"damaged package {package.id}: target build id {wanted!r} is not hex")
        running = kernel.running_build_id()
        if running is None:
            raise BadInput(f"package {package.id} is for kernel {target.release} with build id "
                           f"{wanted}; this kernel ({release}) shows no build id in "
                           f"{kernel.KERNEL_NOTES}, so that cannot be checked")
        if running != wanted.lower():
            raise BadInput(f"package {package.id} is for kernel {target.release}; this kernel "
                           f"is {release} (package: build id {wanted}; running: build id "
                           f"{running})")
        return
    if target.release != release:
        raise BadInput(f"package {package.id} is for kernel {target.release}; "
                       f"this kernel is {release}")
    banner = target.version
    if banner:
        # "6.1.0-53-amd64 (builder) #1 SMP ... Debian 6.1.187-1 (date)" against /proc/version,
        # "Linux version 6.1.0-53-amd64 (builder) (compiler ...) #1 SMP ... (date)".
        m = re.match(r"(\S+) (\(\S+\)) (#.*)$", banner)
        version = kernel.proc_version()
        if m and not (version.startswith(f"Linux version {m.group(1)} {m.group(2)}")
                      and version.endswith(m.group(3))):
            raise BadInput(f"package {package.id} is for '{banner}'; this kernel is '{version}'")




def apply(path: Path, retries: int = 5, retry_delay: float = 1.0) -> dict:
    kernel.require_root()
    package = Package.read(path)
    check_target(package)
    with locked():
        cleanup()
        return _apply(package, retries, retry_delay)


def _apply(package: Package, retries: int, retry_delay: float) -> dict:
    manifest = package.manifest
    applied = coreproto.state()
    if any(u.id == package.id for u in applied):
        raise NothingToDo(f"update {package.id} is already applied")
    check_lockdown()
    t0 = time.monotonic()
    ks = kernel.Kallsyms()
    matcher = Matcher(ks, kernel.KernelMemory(), applied)
    match = matcher.match(package.pre.functions)
    addresses, unresolved = {}, []
    for ref in manifest.kernel_refs:
        address = matcher.resolve(ref, match)
        if address is None:
            unresolved.append(f"{ref.name} ({ref.object or 'global'}): not found, or "
                              "ambiguous, in the running kernel")
        else:
            addresses[ref.placeholder] = address
    if unresolved:
        raise Refused("the new code refers to symbols this kernel does not have", unresolved)
    t_match = time.monotonic() - t0
    redirected = kernel.ipmodify_functions() & {r.name for r in manifest.replaced}
    if redirected:
        raise Refused("another live patch already redirects these functions (livepatch, kpatch or "
                      "another ftrace user that modifies the instruction pointer): its code, not "
                      "livesplice's, would run", sorted(redirected))

    module = manifest.module.name
    if kernel.module_loaded(module):
        raise BadInput(f"module {module} is already loaded but update {package.id} is not applied:"
                       f" remove it first (rmmod {module})")
    new_code = kernel.link_unexported(package.new_code, ks, addresses, manifest.module.file)
    loaded_core = _load_core(package, ks)
    try:
        kernel.insmod(module, new_code)
        switches, ranges = _switches(package, match)
        figures = coreproto.call(
            coreproto.apply_request(package.id, module, switches, ranges, max(1, retries),
                                    int(retry_delay * 1000)), "apply", package.id)
    except BaseException:
        if kernel.module_loaded(module):
            kernel.rmmod(module)
        if loaded_core:
            _unload_core_if_idle()
        raise
    (STATE_DIR / f"{package.id}.json").write_text(json.dumps(manifest.to_json()))
    return {"id": package.id, "module": module,
            "functions": [r.name for r in manifest.replaced],
            "pause_ns": figures.get("pause_ns", 0), "work_ns": figures.get("work_ns", 0),
            "attempts": figures.get("attempts", 1), "match_seconds": t_match,
            "total_seconds": time.monotonic() - t0}


def _switches(package: Package, match: MatchResult
              ) -> tuple[list[coreproto.Switch], list[coreproto.CodeRange]]:
    """The jumps to write, and the old code no thread may be in when they are written."""
    manifest = package.manifest
    module = manifest.module.name
    switches, ranges = [], []
    for i, r in enumerate(manifest.replaced):
        fm = match.functions[(r.object, r.name)]
        target = kernel.module_section(module, r.new_section)
        switches.append(coreproto.Switch(r.name, fm.site, target, fm.expect))
        ranges.append(coreproto.CodeRange(fm.original, fm.original + fm.size, i))
        if fm.live != fm.original:
            ranges.append(coreproto.CodeRange(fm.live, fm.live + fm.size, i))
        for part in r.parts:
            pm = match.functions.get((r.object, part))
            if pm is not None:
                ranges.append(coreproto.CodeRange(pm.live, pm.live + pm.size, i))
    return switches, ranges


def _load_core(package: Package, ks: kernel.Kallsyms) -> bool:
    """Load the package's core module unless a core is loaded; whether this call loaded it.
    A loaded core is used whichever package brought it, provided it speaks this livesplice's
    protocol (coreproto.state checks): it holds the state of every applied update."""
    if coreproto.core_loaded():
        coreproto.state()
        return False
    core = kernel.link_unexported(package.members[CORE_MEMBER], ks, None, CORE_MEMBER)
    kernel.insmod(coreproto.CORE_MODULE, core)
    return True


def _unload_core_if_idle() -> bool:
    """Unload the core if no update depends on it; whether it did."""
    if coreproto.core_loaded() and not coreproto.state():
        kernel.rmmod(coreproto.CORE_MODULE)
        return True
    return False


def undo(update_id: str, retries: int = 5, retry_delay: float = 1.0, force: bool = False) -> dict:
    kernel.require_root()
    with locked():
        cleanup()
        applied = coreproto.state()
        update = next((u for u in applied if u.id == update_id), None)
        if update is None:
            known = ", ".join(u.id for u in applied) or "none"
            raise BadInput(f"no applied update {update_id!r} (applied: {known})")
        saved = STATE_DIR / f"{update_id}.json"
        pending = json.loads(saved.read_text()).get("callbacks", []) if saved.exists() else []
        if pending and not force:
            raise Refused(f"update {update_id}'s new code takes the address of functions it "
                          "brings (timer, work or other callbacks, which no stack shows): if one "
                          "is still queued, undo would free code it will run; undo --force once "
                          "you know none is", pending)
        figures = coreproto.call(coreproto.undo_request(update_id, max(1, retries),
                                                        int(retry_delay * 1000)),
                                 "undo", update_id)
        kernel.rmmod(update.module)
        _unload_core_if_idle()
        (STATE_DIR / f"{update_id}.json").unlink(missing_ok=True)
    return {"id": update_id, "pause_ns": figures.get("pause_ns", 0),
            "attempts": figures.get("attempts", 1)}


def cleanup_command() -> list[str]:
    kernel.require_root()
    with locked():
        return cleanup()


def _applied() -> list[coreproto.AppliedUpdate]:
    with locked():
        return coreproto.state()


def list_applied() -> list[dict]:
    kernel.require_root()
    out = []
    applied = _applied()
    # A live patch enabled after an update redirects at the fentry site, before the jump: its
    # code runs, not the update's. Say so rather than list the update as if it ran.
    redirected = kernel.ipmodify_functions() if applied else set()
    for u in applied:
        out.append({"id": u.id, "module": u.module, "functions": [f.name for f in u.funcs],
                    "pause_ns": u.pause_ns,
                    "overridden": sorted({f.name for f in u.funcs} & redirected)})
    return out


def view_applied(update_id: str | None) -> list[dict] | dict:
    kernel.require_root()
    applied = _applied()
    if update_id is None:
        return [{"id": u.id, "module": u.module,
                 "functions": [{"name": f.name, "site": f"{f.site:#x}", "new": f"{f.target:#x}"}
                               for f in u.funcs]} for u in applied]
    update = next((u for u in applied if u.id == update_id), None)
    if update is None:
        raise BadInput(f"no applied update {update_id!r}")
    saved = STATE_DIR / f"{update_id}.json"
    manifest = json.loads(saved.read_text()) if saved.exists() else {}
    return {"id": update.id, "module": update.module,
            "functions": [{"name": f.name, "site": f"{f.site:#x}", "new": f"{f.target:#x}"}
                          for f in update.funcs],
            # (the saved manifest's "kernel" was "target" in package format 2)
            "patch": manifest.get("patch"),
            "target": manifest.get("kernel", manifest.get("target"))}


def empty_pause(package_path: Path, runs: int = 20) -> dict:
    """Pause of an empty stop_machine() on this kernel, measured by the core module (loaded from
    the package for the purpose when it is not loaded already)."""
    kernel.require_root()
    package = Package.read(package_path)
    check_target(package)
    with locked():
        loaded = _load_core(package, kernel.Kallsyms())
        try:
            return coreproto.call(coreproto.bench_request(runs), "bench")
        finally:
            if loaded:
                _unload_core_if_idle()
