"""`apply`, `undo`, `list`, `view`: switch the running kernel to an update's code, and back.

apply: check the package and that it targets this kernel; match its pre code against the running
kernel (runpre); load the core module if needed and the new code with its kernel references set to
the addresses matching found; then ask the core to switch, under stop_machine, when no thread is in
the code being replaced. On any failure everything loaded for this apply is unloaded again.
What is applied is the core's state (debugfs), so `list` is right even after the tool crashed;
the manifests kept in /run (gone at reboot, like the updates themselves) add the patch text.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import time
from pathlib import Path

from . import kernel
from .errors import BadInput, LivespliceError, NothingToDo, Refused
from .newcode import PLACEHOLDER_PREFIX, entry_sections
from .package import Package
from .runpre import Matcher

STATE_DIR = Path(os.environ.get("LIVESPLICE_STATE", "/run/livesplice"))
SKIP_TARGET_CHECK = "LIVESPLICE_UNSAFE_SKIP_TARGET_CHECK"  # tests only: reach run-pre matching
SHN_ABS = 0xFFF1


def core_call(request: str, refusals: tuple[str, ...] = ("busy", "mismatch")) -> dict[str, int]:
    """Send a request to the core; its figures (pause_ns=...) on success. A refusal of a safety
    check (busy, mismatch, stacked) raises Refused, anything else LivespliceError."""
    result = kernel.core_request(request)
    if result.startswith("ok"):
        return {k: int(v) for k, v in (p.split("=", 1) for p in result.split()[3:])}
    message = result.split(" ", 1)[1] if " " in result else result
    if result.startswith(refusals):
        raise Refused(message)
    raise LivespliceError(f"the core refused: {message}")


def check_target(package: Package) -> None:
    target = package.manifest["target"]
    if os.environ.get(SKIP_TARGET_CHECK) == "1":
        return
    release = kernel.running_release()
    if target["release"] != release:
        raise BadInput(f"package {package.id} is for kernel {target['release']}; "
                       f"this kernel is {release}")
    banner = target.get("version")
    if banner:
        # "6.1.0-53-amd64 (builder) #1 SMP ... Debian 6.1.187-1 (date)" against /proc/version,
        # "Linux version 6.1.0-53-amd64 (builder) (compiler ...) #1 SMP ... (date)".
        m = re.match(r"(\S+) (\(\S+\)) (#.*)$", banner)
        version = kernel.proc_version()
        if m and not (version.startswith(f"Linux version {m.group(1)} {m.group(2)}")
                      and version.endswith(m.group(3))):
            raise BadInput(f"package {package.id} is for '{banner}'; this kernel is '{version}'")


def resolve_module(ko: bytes, addresses: dict[str, int]) -> bytes:
    """The new-code module with each placeholder symbol made absolute at its kernel address."""
    from elftools.elf.elffile import ELFFile
    import io

    elf = ELFFile(io.BytesIO(ko))
    symtab = elf.get_section_by_name(".symtab")
    out = bytearray(ko)
    base = symtab["sh_offset"]
    missing = []
    for i, sym in enumerate(symtab.iter_symbols()):
        if sym.name.startswith(PLACEHOLDER_PREFIX):
            if sym.name not in addresses:
                missing.append(sym.name)
                continue
            entry = base + i * symtab["sh_entsize"]
            struct.pack_into("<HQ", out, entry + 6, SHN_ABS, addresses[sym.name])
    if missing:
        raise LivespliceError(f"no address for {', '.join(missing)}")
    return bytes(out)


def apply(path: Path, retries: int = 5, retry_delay: float = 1.0) -> dict:
    kernel.require_root()
    package = Package.read(path)
    check_target(package)
    manifest = package.manifest
    applied = kernel.core_state()
    if any(u.id == package.id for u in applied):
        raise NothingToDo(f"update {package.id} is already applied")
    t0 = time.monotonic()
    ks = kernel.Kallsyms()
    memory = kernel.KernelMemory()
    matcher = Matcher(ks, memory, applied)
    match = matcher.match(package.pre["functions"])
    addresses, unresolved = {}, []
    for ref in manifest["kernel_refs"]:
        address = matcher.resolve(ref, match)
        if address is None:
            unresolved.append(f"{ref['name']} ({ref['object'] or 'global'}): not found, or "
                              "ambiguous, in the running kernel")
        else:
            addresses[ref["placeholder"]] = address
    if unresolved:
        raise Refused("the new code refers to symbols this kernel does not have", unresolved)
    t_match = time.monotonic() - t0

    records = {(r["object"], r["name"]): r for r in package.pre["functions"]}
    module = manifest["module"]["name"]
    if kernel.module_loaded(module):
        raise BadInput(f"module {module} is already loaded but update {package.id} is not applied:"
                       f" remove it first (rmmod {module})")
    with tempfile.TemporaryDirectory(prefix="livesplice-") as tmp:
        loaded_core = _load_core(package, ks)
        ko = Path(tmp) / f"{module}.ko"
        ko.write_bytes(resolve_module(package.members[manifest["module"]["file"]], addresses))
        try:
            kernel.insmod(ko)
        except LivespliceError:
            _unload_core_if_idle(loaded_core)
            raise
    try:
        figures = core_call(_apply_request(package, match, records, ks, memory, retries,
                                           retry_delay))
    except BaseException:
        _cleanup(module, loaded_core)
        raise
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    (STATE_DIR / f"{package.id}.json").write_text(json.dumps(manifest))
    return {"id": package.id, "module": module, "functions": [r["name"] for r in manifest["replaced"]],
            "pause_ns": figures.get("pause_ns", 0), "work_ns": figures.get("work_ns", 0),
            "attempts": figures.get("attempts", 1), "match_seconds": t_match,
            "total_seconds": time.monotonic() - t0}


def _apply_request(package, match, records, ks, memory, retries, retry_delay) -> str:
    manifest = package.manifest
    module = manifest["module"]["name"]
    this_module = kernel.module_section(module, ".gnu.linkonce.this_module")  # its struct module
    lines = [f"apply {package.id} {this_module:x} {module} {max(1, retries)} "
             f"{int(retry_delay * 1000)}"]
    ranges, new_ranges = [], []
    sizes = _section_sizes(package.members[manifest["module"]["file"]])
    for i, r in enumerate(manifest["replaced"]):
        fm = match.functions[(r["object"], r["name"])]
        record = records[(r["object"], r["name"])]
        site = fm.original + (5 if record.get("fentry") == 0 else 0)
        new_section, part_sections = entry_sections(r)
        target = kernel.module_section(module, new_section)
        expect = memory.read(site, 5)
        lines.append(f"f {r['name']} {site:x} {target:x} {expect.hex()}")
        ranges.append(f"r {fm.original:x} {fm.original + fm.size:x} {i}")
        if fm.live != fm.original:
            ranges.append(f"r {fm.live:x} {fm.live + fm.size:x} {i}")
        for part in r["parts"]:
            pm = match.functions.get((r["object"], part))
            if pm is not None:
                ranges.append(f"r {pm.live:x} {pm.live + pm.size:x} {i}")
        new_ranges.append(f"n {target:x} {target + r['new_size']:x} {i}")
        for part_section in part_sections:
            start = kernel.module_section(module, part_section)
            new_ranges.append(f"n {start:x} {start + sizes[part_section]:x} {i}")
    return "\n".join(lines + ranges + new_ranges) + "\n"


def _load_core(package: Package, ks: kernel.Kallsyms) -> bool:
    """Load the package's core module unless a core is loaded; whether this call loaded it."""
    if kernel.module_loaded(kernel.CORE_MODULE):
        return False
    with tempfile.TemporaryDirectory(prefix="livesplice-") as tmp:
        core = Path(tmp) / "livesplice_core.ko"
        core.write_bytes(package.members["modules/livesplice_core.ko"])
        kernel.insmod(core, f"text_poke_addr={ks.address('text_poke_kgdb'):#x}")
    return True


def _section_sizes(ko: bytes) -> dict[str, int]:
    import io

    from elftools.elf.elffile import ELFFile
    return {s.name: s["sh_size"] for s in ELFFile(io.BytesIO(ko)).iter_sections()}


def _cleanup(module: str, loaded_core: bool) -> None:
    if kernel.module_loaded(module):
        kernel.rmmod(module)
    _unload_core_if_idle(loaded_core)


def _unload_core_if_idle(loaded_core: bool = True) -> None:
    if kernel.module_loaded(kernel.CORE_MODULE) and not kernel.core_state():
        kernel.rmmod(kernel.CORE_MODULE)


def undo(update_id: str, retries: int = 5, retry_delay: float = 1.0) -> dict:
    kernel.require_root()
    applied = kernel.core_state()
    update = next((u for u in applied if u.id == update_id), None)
    if update is None:
        known = ", ".join(u.id for u in applied) or "none"
        raise BadInput(f"no applied update {update_id!r} (applied: {known})")
    figures = core_call(f"undo {update_id} {max(1, retries)} {int(retry_delay * 1000)}\n",
                        ("busy", "stacked", "mismatch"))
    kernel.rmmod(update.module)
    _unload_core_if_idle()
    (STATE_DIR / f"{update_id}.json").unlink(missing_ok=True)
    return {"id": update_id, "pause_ns": figures.get("pause_ns", 0),
            "attempts": figures.get("attempts", 1)}


def list_applied() -> list[dict]:
    kernel.require_root()
    out = []
    for u in kernel.core_state():
        out.append({"id": u.id, "module": u.module, "functions": [f.name for f in u.funcs],
                    "pause_ns": u.pause_ns})
    return out


def view_applied(update_id: str | None) -> list[dict] | dict:
    kernel.require_root()
    applied = kernel.core_state()
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
            "patch": manifest.get("patch"), "target": manifest.get("target")}


def empty_pause(package_path: Path, runs: int = 20) -> dict:
    """Pause of an empty stop_machine() on this kernel, measured by the core module (loaded from
    the package for the purpose when it is not loaded already)."""
    kernel.require_root()
    package = Package.read(package_path)
    check_target(package)
    loaded = _load_core(package, kernel.Kallsyms())
    try:
        return core_call(f"bench {runs}\n")
    finally:
        if loaded:
            _unload_core_if_idle()
