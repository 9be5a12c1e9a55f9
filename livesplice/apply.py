"""`apply`, `undo`, `list`, `view`, `cleanup`: switch the running kernel to an update's code, and back.

apply: check the package and that it targets this kernel; match its pre code against the running
kernel (runpre); load the core module if needed and the new code with its kernel references set to
the addresses matching found; then ask the core to switch, with every CPU stopped, when no thread
is in the code being replaced. On any failure everything loaded for this apply is unloaded again.
The checks before anything is loaded are one function, `check_apply`; a dry run stops after it.
Each apply and undo, done or failed, is recorded in the system journal (`journal`).
A module target that is loaded is matched here and patched with the rest; one that is not waits:
the core is given everything it needs (`module_targets`) and patches it when it loads
(docs/module-targets.md).
What is applied is the core's state, so `list` is right even after the tool crashed; the manifests
kept in /run (gone at reboot, like the updates themselves) add the patch text. Commands that change
or read the updates hold one lock, so two of them never interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import coreproto, journal, kernel
from .elfmodel import ENDBR64, ENDBR_POISON
from .errors import EXIT_INTERNAL, EXIT_NOTHING, BadInput, LivespliceError, NothingToDo, Refused
from .objdiff import jump_offset
from .package import CORE_MODULE as CORE_MEMBER
from .package import Package
from .pkgformat import MODULE_PREFIX, VMLINUX, Manifest, PreFunction
from .runpre import Matcher, MatchResult

STATE_DIR = Path(os.environ.get("LIVESPLICE_STATE", "/run/livesplice"))
SKIP_TARGET_CHECK = "LIVESPLICE_UNSAFE_SKIP_TARGET_CHECK"  # tests only: reach run-pre matching

log = logging.getLogger(__name__)


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
    return [d.name for d in sorted(Path("/sys/module").glob(MODULE_PREFIX + "*"))
            if d.name != coreproto.CORE_MODULE and d.name not in in_use
            and (d / "sections").is_dir()]


def leftovers(applied: list[coreproto.AppliedUpdate]) -> list[str]:
    """What cleanup would unload, in that order: leftover update modules, then an idle core."""
    names = _leftover_modules(applied)
    # (shadow data keep the core: it holds them for the updates to come)
    if coreproto.core_loaded() and not applied and not coreproto.shadow_in_use():
        names.append(coreproto.CORE_MODULE)
    return names


def cleanup() -> list[str]:
    """Unload what a killed command left loaded but not switched: update modules the core does
    not know as applied, and an idle core. Call with the lock held; returns what was unloaded."""
    removed = leftovers(coreproto.state())
    for name in removed:
        log.info("unloading %s, left loaded by an interrupted command", name)
        kernel.rmmod(name)
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


@dataclass
class ApplyPlan:
    """What apply will do, once every check has passed; finding it out changed nothing."""

    package: Package
    match: MatchResult
    addresses: dict[str, int]  # the new code's placeholders -> kernel addresses
    new_code: bytes  # the update's module, linked against this kernel
    core: bytes | None  # the core module to load first; None: a core is loaded and in use
    unload_first: list[str]  # what an interrupted command left loaded, which cleanup unloads
    started: float  # time.monotonic() when the kernel's checks began
    match_seconds: float
    loaded_targets: list[str]  # module targets loaded now (patched at apply); the rest wait

    @property
    def waiting_targets(self) -> list[str]:
        return [t.name for t in self.package.manifest.targets
                if t.name != VMLINUX and t.name not in self.loaded_targets]

    def target_states(self) -> list[dict]:
        return [{"name": t.name, "build_id": t.build_id,
                 "state": "waiting" if t.name in self.waiting_targets else "patched"}
                for t in self.package.manifest.targets]

    @property
    def module(self) -> str:
        return self.package.manifest.module.name

    def dry_run_report(self) -> dict:
        manifest = self.package.manifest
        by_placeholder = {r.placeholder: r for r in manifest.kernel_refs}
        return {
            "id": self.package.id, "module": self.module, "dry_run": True,
            "functions": [r.name for r in manifest.replaced],
            "jumps": [{"name": fm.name, "object": fm.object, "site": f"{fm.site:#x}",
                       "runs": f"{fm.live:#x}", "expect": fm.expect.hex()}
                      for fm in (self.match.functions.get((r.object, r.name))
                                 for r in manifest.replaced) if fm is not None],
            "rewrites": [{"name": om.name, "object": om.object, "address": f"{om.address:#x}",
                          "ranges": [[r.offset, r.length] for r in w.ranges]}
                         for w in manifest.rewrites
                         for om in [self.match.objects[(w.object, w.name)]]],
            "targets": [{**s, "state": "would wait" if s["state"] == "waiting" else "would patch"}
                        for s in self.target_states()],
            "kernel_refs": [{"name": by_placeholder[p].name,
                             "object": by_placeholder[p].object or None, "address": f"{a:#x}"}
                            for p, a in sorted(self.addresses.items())],
            "would_unload": self.unload_first,
            "would_load": ([coreproto.CORE_MODULE] if self.core is not None else []) + [self.module],
            "signed_by": self.package.signature.key_id if self.package.signature else None,
            "trusted": self.package.signer is not None,
            "match_seconds": self.match_seconds,
            "total_seconds": time.monotonic() - self.started,
        }


def check_apply(package: Package, applied: list[coreproto.AppliedUpdate],
                unload_first: list[str]) -> ApplyPlan:
    """Every check apply makes on the running kernel, in apply's order, touching nothing: whether
    the update is applied already, lockdown, run-pre matching against /proc/kcore (stacked on
    `applied`), the new code's kernel references, other live patches on the same functions, the
    module's name, the links of the modules against this kernel. `unload_first`: what cleanup
    unloads before apply loads anything (empty once it has run)."""
    manifest = package.manifest
    if any(u.id == package.id for u in applied):
        raise NothingToDo(f"update {package.id} is already applied")
    check_lockdown()
    t0 = time.monotonic()
    loaded = loaded_module_targets(manifest)
    ks = kernel.Kallsyms()
    memory = kernel.KernelMemory()
    matcher = Matcher(ks, memory, applied)
    # vmlinux's pre code, and the replaced functions of the module targets loaded now (create
    # used the witnesses of module code already: the core finds module symbols by position).
    records = [r for r in package.pre.functions if r.target == VMLINUX
               or (r.target in loaded and not r.referenced_only)]
    log.info("run-pre matching %d functions against /proc/kcore", len(records))
    if package.pre.objects:
        log.info("run-pre matching %d objects rewritten in place", len(package.pre.objects))
    match = matcher.match(records, package.pre.objects)
    for fm in match.functions.values():
        log.debug("matched %s (%s) at %#x, running at %#x", fm.name, fm.object, fm.original, fm.live)
    addresses, unresolved = {}, []
    for ref in manifest.kernel_refs:
        if ref.target not in ("", VMLINUX):
            addresses[ref.placeholder] = 0  # held: the core links it into its module (held)
            continue
        address = matcher.resolve(ref, match)
        if address is None:
            unresolved.append(f"{ref.name} ({ref.object or 'global'}): not found, or "
                              "ambiguous, in the running kernel")
        else:
            log.debug("kernel reference %s (%s) at %#x", ref.name, ref.object or "global", address)
            addresses[ref.placeholder] = address
    if unresolved:
        raise Refused("the new code refers to symbols this kernel does not have", unresolved)
    if manifest.kernel.ibt:
        check_endbr(manifest, addresses, ks, memory)
    t_match = time.monotonic() - t0
    log.info("run-pre matching passed, %d kernel references resolved (%.2f s)", len(addresses),
             t_match)
    redirected = kernel.ipmodify_functions() & {r.name for r in manifest.replaced}
    if redirected:
        raise Refused("another live patch already redirects these functions (livepatch, kpatch or "
                      "another ftrace user that modifies the instruction pointer): its code, not "
                      "livesplice's, would run", sorted(redirected))

    module = manifest.module.name
    if kernel.module_loaded(module) and module not in unload_first:
        raise BadInput(f"module {module} is already loaded but update {package.id} is not applied:"
                       f" remove it first (rmmod {module})")
    new_code = kernel.link_unexported(package.new_code, ks, addresses, manifest.module.file)
    # A loaded core stays (it holds applied updates or shadow data) unless cleanup unloads it
    # as idle: then the package's core loads.
    core_stays = coreproto.core_loaded() and coreproto.CORE_MODULE not in unload_first
    if core_stays:
        check_core_features(new_code, manifest)
    core = (None if applied or core_stays else
            kernel.link_unexported(package.members[CORE_MEMBER], ks, None, CORE_MEMBER))
    return ApplyPlan(package, match, addresses, new_code, core, unload_first, t0, t_match, loaded)


def check_endbr(manifest: Manifest, addresses: dict[str, int], ks: kernel.Kallsyms,
                memory: kernel.KernelMemory) -> None:
    """On a kernel built with IBT, refuse new code that takes the address of a kernel function
    without an ENDBR at its start: called indirectly (by the new code, or by the kernel through
    a rewritten table) it would fault (#CP) on a CPU that enforces IBT. The kernel seals at boot
    the ENDBR of every function whose address vmlinux never takes; QEMU does not enforce IBT, so
    only this check catches it before a real machine would."""
    problems = []
    for ref in manifest.kernel_refs:
        address = addresses.get(ref.placeholder)
        if not ref.address_taken or not address or ref.kind == "object":
            continue
        if not any(s.address == address and s.is_text for s in ks.symbols(ref.name)):
            continue  # data (a symbol of kind notype)
        start = memory.read(address, len(ENDBR64))
        if start == ENDBR_POISON:
            problems.append(f"{ref.name}: its ENDBR was sealed at boot (vmlinux never takes its "
                            "address), so an indirect call to it faults on a CPU with IBT")
        elif start != ENDBR64:
            problems.append(f"{ref.name}: it does not start with ENDBR ({start.hex()}), so an "
                            "indirect call to it faults on a CPU with IBT")
    if problems:
        raise Refused("the new code takes the address of kernel functions that cannot be called "
                      "indirectly on this kernel (X86_KERNEL_IBT)", problems)


def check_core_features(new_code: bytes, manifest: Manifest) -> None:
    """Refuse an update that needs what the loaded core, which stays, is too old to have: the
    exports of livesplice.h's shadow data (its module would not load), hooks (k lines), or
    rewrites of data in place (w lines)."""
    info = coreproto.core_info()
    if info is None:
        return
    needed = sorted({name for _, name in kernel.undefined_symbols(new_code, manifest.module.file)}
                    & kernel.CORE_EXPORTS)
    missing = ([f"shadow data ({', '.join(needed)})"] if needed and "shadow" not in info.features
               else [])
    if manifest.hooks and "hooks" not in info.features:
        missing.append(f"hooks ({', '.join(sorted({h.function for h in manifest.hooks}))})")
    if manifest.rewrites and "rewrite" not in info.features:
        missing.append("data rewritten in place ("
                       + ", ".join(sorted({w.name for w in manifest.rewrites})) + ")")
    if missing:
        raise Refused("the update uses features the loaded core predates (it holds "
                      "applied updates, so it is not replaced): undo them (livesplice undo --all) "
                      "and apply again", missing)


def loaded_module_targets(manifest: Manifest) -> list[str]:
    """The package's module targets that are loaded now; Refused if one of them is another
    build of the module than the package's."""
    loaded = []
    for target in manifest.targets:
        if target.name == VMLINUX or not kernel.module_loaded(target.name):
            continue
        running = kernel.module_build_id(target.name)
        if target.build_id and running and running != target.build_id.lower():
            raise Refused(f"module {target.name} is loaded, but it is not the build the update "
                          f"was made for (build id {running}; the update's: {target.build_id}); "
                          "nothing was changed")
        loaded.append(target.name)
    return loaded


def read_package(path: Path) -> Package:
    """The package at `path`, read and checked (signature, hashes, fields), and for this kernel."""
    log.info("reading package %s", path)
    package = Package.read(path)
    signer = package.signature.key_id if package.signature else None
    log.info("package %s: update %s for %s, %s", path, package.id,
             package.manifest.kernel.release, f"signed by key {signer}" if signer else "unsigned")
    check_target(package)
    log.info("the package is for this kernel")
    return package


def apply(path: Path, retries: int = 5, retry_delay: float = 1.0, dry_run: bool = False) -> dict:
    """Apply the update package at `path`. With `dry_run`, make every check an apply makes and
    say what it would do, loading nothing: the same errors, so the same exit status."""
    kernel.require_root()
    try:
        package = read_package(path)
        with locked():
            if dry_run:
                applied = coreproto.state()
                return check_apply(package, applied, leftovers(applied)).dry_run_report()
            cleanup()
            result = _apply(check_apply(package, coreproto.state(), []), retries, retry_delay)
    except Exception as exc:
        if not dry_run:
            _journal_failure(f"apply of {path}", exc)
        raise
    journal.record(f"applied update {result['id']} from {path} ({_signed(package)}): "
                   f"{', '.join(result['functions'])}; the machine stopped "
                   f"{result['pause_ns'] / 1e6:.3f} ms")
    return result


def _signed(package: Package) -> str:
    if package.signer is not None:
        return f"signed by trusted key {package.signer}"
    if package.signature is not None:
        return f"signed by key {package.signature.key_id}, no trusted keys configured"
    return "unsigned"


def _journal_failure(what: str, exc: Exception) -> None:
    status = getattr(exc, "exit_status", EXIT_INTERNAL)
    reasons = getattr(exc, "reasons", [])
    journal.record(f"{what} failed (exit status {status}): {exc}"
                   + "".join(f"; {r}" for r in reasons[:5]),
                   logging.WARNING if status == EXIT_NOTHING else logging.ERROR)


def _apply(plan: ApplyPlan, retries: int, retry_delay: float) -> dict:
    package, module = plan.package, plan.module
    loaded_core = plan.core is not None
    if plan.core is not None:
        log.info("loading the core module %s", coreproto.CORE_MODULE)
        kernel.insmod(coreproto.CORE_MODULE, plan.core)
    try:
        log.info("loading the new code, module %s", module)
        kernel.insmod(module, plan.new_code)
        switches, ranges = _switches(package, plan.match)
        targets = module_targets(package.manifest, package.pre.functions,
                                 lambda section: kernel.module_section(module, section))
        log.info("switching %d functions%s", len(switches) + sum(len(t.functions) for t in targets),
                 f"; waiting for {', '.join(plan.waiting_targets)}" if plan.waiting_targets else "")
        figures = coreproto.call(
            coreproto.apply_request(package.id, module, switches, ranges, max(1, retries),
                                    int(retry_delay * 1000), targets,
                                    hook_calls(package.manifest, module),
                                    data_writes(package.manifest, plan.match, module)),
            "apply", package.id)
    except BaseException:
        if kernel.module_loaded(module):
            kernel.rmmod(module)
        if loaded_core:
            _unload_core_if_idle()
        raise
    (STATE_DIR / f"{package.id}.json").write_text(json.dumps(package.manifest.to_json()))
    log.info("applied %s: the machine stopped for %.3f ms", package.id,
             figures.get("pause_ns", 0) / 1e6)
    states = {u.id: u for u in coreproto.state()}.get(package.id)
    return {"id": package.id, "module": module, "dry_run": False,
            "functions": [r.name for r in package.manifest.replaced],
            "targets": target_records(package.manifest.targets, states),
            "pause_ns": figures.get("pause_ns", 0), "work_ns": figures.get("work_ns", 0),
            "attempts": figures.get("attempts", 1), "match_seconds": plan.match_seconds,
            "total_seconds": time.monotonic() - plan.started}


def data_writes(manifest: Manifest, match: MatchResult, module: str) -> list[coreproto.DataWrite]:
    """The rewrites in place as the core makes them: each changed range of each object, from
    the module's relocated copy, expecting what run-pre matching found."""
    writes = []
    for w in manifest.rewrites:
        om = match.objects[(w.object, w.name)]
        source = kernel.module_section(module, w.new_section)
        for r in w.ranges:
            writes.append(coreproto.DataWrite(w.name, om.address + r.offset, source + r.offset,
                                              om.contents[r.offset:r.offset + r.length]))
    return writes


def hook_calls(manifest: Manifest, module: str) -> list[coreproto.HookCall]:
    """The author's hooks as the core runs them: each function's address in the loaded module."""
    return [coreproto.HookCall(h.kind, h.target, kernel.module_section(module, h.new_section))
            for h in manifest.hooks]


def _switches(package: Package, match: MatchResult
              ) -> tuple[list[coreproto.Switch], list[coreproto.CodeRange]]:
    """The jumps to write, and the old code no thread may be in when they are written."""
    manifest = package.manifest
    module = manifest.module.name
    switches, ranges = [], []
    for i, r in enumerate(r for r in manifest.replaced if r.target == VMLINUX):
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


def module_targets(manifest: Manifest, pre: list[PreFunction], section_address: Callable[[str], int]
                   ) -> list[coreproto.ModuleTarget]:
    """What the core needs to check, link and patch each module target, now or when it loads:
    the replaced functions by position, their pre code with what to skip and what to check, and
    the new code's fields that refer into the module (protocol 3, docs/core-protocol.md).
    `section_address` is where a section of the loaded update module is."""
    records = {r.key: r for r in pre}
    refs = {r.placeholder: r for r in manifest.kernel_refs}
    out = []
    for target in manifest.targets:
        if target.name == VMLINUX:
            continue
        functions = []
        for r in manifest.replaced:
            if r.target != target.name:
                continue
            rec = records[(r.object, r.name)]
            masks = [(m.offset, m.length) for m in rec.masks]
            masked = bytearray(rec.size)
            for off, length in masks:
                masked[off:off + length] = b"\1" * length
            checks = []
            for rel in rec.relocs:
                if rel.kind != "sym" or any(masked[rel.offset:rel.offset + rel.width]):
                    masks.append((rel.offset, rel.width))  # a string, a section, a rewritten site
                else:
                    checks.append(coreproto.FieldCheck(rel.offset, rel.type, rel.name, rel.sympos,
                                                       rel.addend))
            # Its .cold parts that the pre code has (placed in the module by create): old code
            # too, which no thread may be in when it switches.
            parts = [(part.name, part.sympos, part.size) for part in
                     (records.get((r.object, name)) for name in r.parts) if part is not None]
            functions.append(coreproto.ModuleFunction(
                rec.name, rec.sympos, rec.size, jump_offset(rec.fentry, rec.data()[:8]),
                section_address(r.new_section), rec.data(), masks, checks, parts))
        held = []
        for h in manifest.held:
            if h.target != target.name:
                continue
            ref = refs[h.placeholder]
            own = ref.target == target.name
            # Another module's symbol by its qualified name (kallsyms' "MODULE:NAME"): a bare
            # name could be found in vmlinux first, as a static of the same name.
            held.append(coreproto.HeldField(section_address(h.section) + h.offset,
                                            h.type, ref.name if own else f"{ref.target}:{ref.name}",
                                            ref.sympos if own else 0, h.addend))
        out.append(coreproto.ModuleTarget(target.name, target.build_id, functions, held))
    return out


def target_records(targets, update: coreproto.AppliedUpdate | None) -> list[dict]:
    """Each target of an update and its state: vmlinux is patched while the update is applied;
    a module target is patched, or waits for its module to load."""
    states = update.targets if update is not None else {}
    return [{"name": t.name, "build_id": t.build_id,
             "state": "patched" if t.name == VMLINUX else states.get(t.name, "waiting")}
            for t in targets]


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
    """Unload the core if nothing depends on it (no update, no shadow data); whether it did."""
    if coreproto.core_loaded() and not coreproto.state() and not coreproto.shadow_in_use():
        kernel.rmmod(coreproto.CORE_MODULE)
        return True
    return False


def undo(update_id: str, retries: int = 5, retry_delay: float = 1.0, force: bool = False) -> dict:
    kernel.require_root()
    try:
        result = _undo(update_id, retries, retry_delay, force)
    except Exception as exc:
        _journal_failure(f"undo of {update_id}", exc)
        raise
    journal.record(f"undone update {update_id}; the machine stopped "
                   f"{result['pause_ns'] / 1e6:.3f} ms")
    return result


def _undo(update_id: str, retries: int, retry_delay: float, force: bool) -> dict:
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
                          "brings (timer, work or other callbacks, which no stack shows), or a "
                          "table it rewrote points into it (TABLE->WHAT: the kernel may have "
                          "copied the pointer): if one is still queued or held, undo would free "
                          "code or data it will use; undo --force once you know none is", pending)
        log.info("switching %s's %d functions back", update_id, len(update.funcs))
        figures = coreproto.call(coreproto.undo_request(update_id, max(1, retries),
                                                        int(retry_delay * 1000)),
                                 "undo", update_id)
        log.info("unloading %s", update.module)
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


def applied_record(update: coreproto.AppliedUpdate, redirected: set[str]) -> dict:
    """An applied update as `list --json` and `view --json` show it (docs/cli-json.md)."""
    vmlinux = [{"name": VMLINUX, "state": "patched"}] if any(
        f.target == VMLINUX for f in update.funcs) else []
    return {"id": update.id, "module": update.module,
            "functions": [f.name for f in update.funcs],  # as apply --json gives them
            # the jumps written now: a waiting module target has none
            "jumps": [{"name": f.name, "site": f"{f.site:#x}", "new": f"{f.new_address:#x}",
                       "target": f.target} for f in update.funcs if f.site],
            "targets": vmlinux + [{"name": name, "state": state}
                                  for name, state in update.targets.items()],
            "pause_ns": update.pause_ns, "work_ns": update.work_ns,
            # A live patch enabled after an update redirects at the fentry site, before the
            # jump: its code runs, not the update's. Say so rather than show it as if it ran.
            "overridden": sorted({f.name for f in update.funcs} & redirected)}


def list_applied() -> list[dict]:
    """The applied updates, oldest first."""
    kernel.require_root()
    applied = _applied()
    redirected = kernel.ipmodify_functions() if applied else set()
    return [applied_record(u, redirected) for u in applied]


def view_applied(update_id: str | None) -> list[dict] | dict:
    """`list_applied()`, or one applied update with its patch and target (from the manifest
    apply kept in /run; None for both if that is gone)."""
    if update_id is None:
        return list_applied()
    kernel.require_root()
    applied = _applied()
    update = next((u for u in applied if u.id == update_id), None)
    if update is None:
        known = ", ".join(u.id for u in applied) or "none"
        raise BadInput(f"no applied update {update_id!r} (applied: {known})")
    saved = STATE_DIR / f"{update_id}.json"
    manifest = json.loads(saved.read_text()) if saved.exists() else {}
    return {**applied_record(update, kernel.ipmodify_functions()),
            # (the saved manifest's "kernel" was "target" in package format 2)
            "patch": manifest.get("patch"),
            "target": manifest.get("kernel", manifest.get("target"))}


def applied_ids() -> list[str]:
    """The applied updates' ids, for shell completion: without the lock (completion must not
    wait) and empty where they cannot be read (not root, no core, an older core)."""
    try:
        return [u.id for u in coreproto.state()]
    except (OSError, ValueError, LivespliceError):
        return []


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
