"""Installed updates: the packages kept for a kernel release, applied again at every boot.

Layout (docs/reboot.md): `/var/lib/livesplice/<kernel release>/` holds each installed package
as `<id>.tar.gz` and `order`, their ids one per line in stacking order (install order). A package
is installed under the release its manifest names, whichever kernel runs: one for another kernel
waits for it, and is never applied to the wrong one (apply checks the build id as always).

`apply --all` applies the running release's installed updates that are not applied yet, in
order; `undo --all` undoes the applied ones, newest first. Both go on past an update that fails
(a later one need not depend on it; one that does is refused by apply's stacking check) and end
with the first failure's exit status.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import apply as applying
from . import coreproto, journal, kernel
from .errors import BadInput, LivespliceError, NothingToDo
from .package import Package

log = logging.getLogger(__name__)

INSTALL_DIR_ENV = "LIVESPLICE_INSTALL_DIR"
ORDER = "order"
# A release names a directory: Debian's are like 6.1.0-53-amd64 or 6.12.111+deb12-amd64.
RELEASE_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_~-]{0,127}")


def install_dir() -> Path:
    return Path(os.environ.get(INSTALL_DIR_ENV, "/var/lib/livesplice"))


@dataclass(frozen=True)
class Installed:
    release: str
    id: str
    path: Path
    sha256: str

    def record(self, running: str, applied: set[str]) -> dict:
        """As `list --installed --json` shows it (docs/cli-json.md)."""
        return {"id": self.id, "release": self.release, "package": str(self.path),
                "sha256": self.sha256, "running_kernel": self.release == running,
                "applied": self.release == running and self.id in applied}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _release_dir(release: str) -> Path:
    if not RELEASE_RE.fullmatch(release) or release in (".", ".."):
        raise BadInput(f"kernel release {release!r} cannot name an install directory")
    return install_dir() / release


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One installer at a time (its own lock: apply's is taken inside it, by apply)."""
    base = install_dir()
    base.mkdir(parents=True, exist_ok=True, mode=0o755)
    with open(base / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _read_order(directory: Path) -> list[str]:
    try:
        text = (directory / ORDER).read_text()
    except FileNotFoundError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def _write_order(directory: Path, ids: list[str]) -> None:
    if not ids:
        (directory / ORDER).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            directory.rmdir()
        return
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".order.")
    with os.fdopen(fd, "w") as f:
        f.write("".join(i + "\n" for i in ids))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / ORDER)


def installed(release: str | None = None) -> list[Installed]:
    """The installed updates, of one release or of all, each release's in stacking order."""
    base = install_dir()
    if release is not None:
        releases = [release]
    else:
        releases = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    out = []
    for rel in releases:
        directory = _release_dir(rel)
        for update_id in _read_order(directory):
            path = directory / f"{update_id}.tar.gz"
            if not path.is_file():
                raise LivespliceError(f"installed update {update_id} of {rel}: {path} is missing "
                                      f"(listed in {directory / ORDER})")
            out.append(Installed(rel, update_id, path, _sha256(path)))
    return out


def _applied_ids() -> set[str]:
    return {u.id for u in coreproto.state()} if coreproto.core_loaded() else set()


def list_installed() -> list[dict]:
    running = kernel.running_release()
    applied = _applied_ids()
    return [i.record(running, applied) for i in installed()]


def install(path: Path, apply_now: bool = True, retries: int = 5,
            retry_delay: float = 1.0) -> dict:
    """Keep the package for its kernel release and, if that kernel runs, apply it (unless
    `apply_now` is false). An apply that fails leaves nothing installed; an update already
    installed and applied is nothing to do."""
    kernel.require_root()
    package = Package.read(path)  # checks hashes and, once keys are trusted, the signature
    release = package.manifest.kernel.release
    running = kernel.running_release()
    with _locked():
        directory = _release_dir(release)
        order = _read_order(directory)
        kept = directory / f"{package.id}.tar.gz"
        digest = _sha256(Path(path))
        already = package.id in order and kept.is_file()
        if already and _sha256(kept) != digest:
            raise BadInput(f"another package with id {package.id} is installed for {release} "
                           f"({kept}): uninstall it first")
        here = release == running
        applied_before = here and package.id in _applied_ids()
        will_apply = apply_now and here and not applied_before
        if already and not will_apply:
            raise NothingToDo(f"update {package.id} is installed for {release} already"
                              + (" and applied" if applied_before else ""))
        result: dict | None = None
        if will_apply:
            # Applied first, kept after: a refused update is not left installed.
            result = applying.apply(Path(path), retries, retry_delay)
        if not already:
            directory.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pkg.")
            with os.fdopen(fd, "wb") as f, open(path, "rb") as src:
                shutil.copyfileobj(src, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, kept)
            _write_order(directory, order + [package.id])
            journal.record(f"installed update {package.id} for {release} as {kept}")
    state = "applied" if (result or applied_before) else (
        "installed" if here else "waiting for its kernel")
    return {"id": package.id, "release": release, "package": str(kept), "state": state,
            "running_kernel": here, "apply": result}


def uninstall(update_id: str, retries: int = 5, retry_delay: float = 1.0,
              force: bool = False) -> dict:
    """Undo the update if it is applied, then stop keeping it (for every release it is
    installed for). Undo refused or failed: it stays installed."""
    kernel.require_root()
    with _locked():
        found = [i for i in installed() if i.id == update_id]
        if not found:
            known = ", ".join(sorted({i.id for i in installed()})) or "none"
            raise BadInput(f"no installed update {update_id!r} (installed: {known})")
        undone = None
        if update_id in _applied_ids():
            undone = applying.undo(update_id, retries, retry_delay, force)
        for item in found:
            directory = item.path.parent
            _write_order(directory, [i for i in _read_order(directory) if i != update_id])
            item.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                directory.rmdir()
            journal.record(f"uninstalled update {update_id} of {item.release}")
    return {"id": update_id, "releases": [i.release for i in found], "undo": undone}


def _each(items: list, action, what: str) -> tuple[list[dict], LivespliceError | None]:
    """Run `action` on each item, going on past failures; the results and the first failure."""
    results, first = [], None
    for item in items:
        try:
            results.append({"id": item.id, "status": 0, "result": action(item)})
        except LivespliceError as exc:
            log.error("%s %s: %s", what, item.id, exc)
            results.append({"id": item.id, "status": exc.exit_status, "error": str(exc)})
            first = first or exc
    return results, first


def apply_all(retries: int = 5, retry_delay: float = 1.0) -> dict:
    """Apply every installed update of the running kernel not applied yet, in order."""
    kernel.require_root()
    running = kernel.running_release()
    with _locked():
        items = installed(running) if _release_dir(running).is_dir() else []
        applied = _applied_ids()
        todo = [i for i in items if i.id not in applied]
        if not todo:
            raise NothingToDo(f"no installed update of {running} waits to be applied"
                              + (f" ({len(items)} installed, all applied)" if items else ""))
        results, first = _each(todo, lambda i: applying.apply(i.path, retries, retry_delay),
                               "apply")
    report = {"release": running, "installed": [i.id for i in items],
              "already_applied": [i.id for i in items if i.id in applied], "updates": results}
    if first is not None:
        raise AllFailed(first, report)
    return report


def undo_all(retries: int = 5, retry_delay: float = 1.0, force: bool = False) -> dict:
    """Undo every applied installed update of the running kernel, newest first."""
    kernel.require_root()
    running = kernel.running_release()
    with _locked():
        items = installed(running) if _release_dir(running).is_dir() else []
        applied = _applied_ids()
        todo = [i for i in reversed(items) if i.id in applied]
        if not todo:
            raise NothingToDo(f"no installed update of {running} is applied")
        results, first = _each(todo, lambda i: applying.undo(i.id, retries, retry_delay, force),
                               "undo")
    report = {"release": running, "updates": results}
    if first is not None:
        raise AllFailed(first, report)
    return report


class AllFailed(LivespliceError):
    """`apply --all`/`undo --all` where some update failed: the first failure's message and exit
    status, with the report of all of them."""

    def __init__(self, first: LivespliceError, report: dict):
        failed = [u["id"] for u in report["updates"] if u["status"]]
        super().__init__(f"{len(failed)} of {len(report['updates'])} failed "
                         f"({', '.join(failed)}); first: {first}")
        self.exit_status = first.exit_status
        self.report = report
