#!/usr/bin/env python3
"""How many real kernel fixes livesplice can apply: every .c file that changed between two Debian
source versions and that the stock config builds into vmlinux or into a module becomes one patch;
each is created, and each created one is tried in the VM on the stock kernel:

- vmlinux: applied, checked (`list`), smoke-checked and undone;
- a module: the module is loaded first (`modprobe`; one that cannot load in the VM is its own
  outcome), then the update applied, checked (`list` shows the module `patched`), smoke-checked
  and undone, and the module unloaded (best effort). Every `--before-load`-th created module
  package is also applied with its module not loaded (`waiting`), then the module loaded
  (`patched`), smoke-checked and undone.

The kernel log must stay clean throughout. Results go, one JSON line per file, to a state file in
the cache (~/.cache/livesplice/corpus/), so an interrupted run continues with `--resume`. A guest
that crashes or hangs is recorded as a failure of that file and the run goes on with a new VM.

Run as root after scripts/setup.sh:
  .venv/bin/python bench/corpus.py [--modules | --all] [--from 6.1.187-1] [--to 6.1.190-1]
      [--limit N] [--sample-every K] [--only FILE...] [--before-load N] [--resume] [--merge]
      [--state FILE] [--report-only]
Writes docs/corpus.md and docs/corpus.json (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from livesplice import debian
from livesplice.build import WorkTree
from livesplice.create import create
from livesplice.errors import LivespliceError, NothingToDo, Refused
from livesplice.includes import module_name
from livesplice.patches import file_patch
from livesplice.pkgformat import VMLINUX
from livesplice.testbed import CommandTimeout, GuestError, Session

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "livesplice"]

APPLIED = "applied and undone"
NOT_LOADABLE = "module does not load in the VM"
# Refusals that put a patch outside the target's share: it changes data, or it is part of a fix
# that also changed other files.
OUTSIDE_SHARE = ("changed data object", "changed layout", "does not build alone")


@dataclass
class CorpusFile:
    file: str
    target: str  # vmlinux, or the name the module loads as
    id: str  # c#### (vmlinux) or m#### (module): its place in the whole list, stable across runs


def changed_c_files(old: Path, new: Path) -> list[str]:
    proc = subprocess.run(["diff", "-rq", str(old), str(new)], capture_output=True, text=True)
    out = []
    for line in proc.stdout.splitlines():
        if line.startswith("Files ") and line.endswith(" differ"):
            path = line.split(" and ")[0][len("Files "):]
            rel = str(Path(path).relative_to(old))
            if rel.endswith(".c"):
                out.append(rel)
    return sorted(out)


def corpus_files(changed: list[str], vmlinux_objects: set[str],
                 module_objects: dict[str, str]) -> tuple[list[CorpusFile], list[CorpusFile]]:
    """The changed files built into vmlinux, and those built into a module, per kbuild."""
    builtin_sources = {o[:-2] + ".c" for o in vmlinux_objects}
    module_sources = {o[:-2] + ".c": path for o, path in module_objects.items()}
    builtin = [f for f in changed if f in builtin_sources]
    modular = [f for f in changed if f in module_sources and f not in builtin_sources]
    return ([CorpusFile(f, VMLINUX, f"c{i:04d}") for i, f in enumerate(builtin)],
            [CorpusFile(f, module_name(module_sources[f]), f"m{i:04d}") for i, f in enumerate(modular)])


def short_reason(reason: str) -> str:
    """A reason without the names in it, for counting."""
    if reason.startswith("modprobe exited"):
        return "modprobe: " + reason.rsplit(": ", 1)[-1][:60]
    for key in ("changed data object", "changed layout of", "changed __init function",
                "changed __exit function", "cannot redirect changed function", "Kconfig or Makefiles",
                "assembly code", "anonymous writable data", "does not match the running kernel",
                "not in /proc/kallsyms", "identical functions of that name", "code busy",
                "does not build alone", "symbols this kernel does not have",
                "no function's object code", "modprobe timed out", "uses static key",
                "loads with kernel log problems"):
        if key in reason:
            return key
    return reason[:60]


def classify_create(item: CorpusFile, old: Path, new: Path, config: Path, out_dir: Path) -> dict:
    rel = item.file
    patch = file_patch(rel, (old / rel).read_text(errors="replace"),
                       (new / rel).read_text(errors="replace"))
    entry: dict = {"file": rel, "target": item.target, "id": item.id,
                   "patch_lines": patch.count("\n")}
    t = time.monotonic()
    try:
        result = create(old, config, patch, item.id, out_dir / f"{item.id}.tar.gz")
        manifest = result.package.manifest
        entry.update(outcome="created", package=str(result.path),
                     functions=[r.name for r in manifest.replaced],
                     new=[n.name for n in manifest.new], callbacks=list(manifest.callbacks),
                     package_targets=[target.name for target in manifest.targets])
    except Refused as exc:
        entry.update(outcome="refused at create", reasons=exc.reasons or [str(exc)])
    except NothingToDo as exc:
        entry.update(outcome="nothing to do", reasons=[str(exc)])
    except LivespliceError as exc:
        text = str(exc)
        if "failed:" in text:
            # A per-file patch of a fix that also changed other files (a header, another .c).
            errors = [line.strip() for line in text.splitlines() if "error:" in line]
            reason = "does not build alone: " + (errors[0] if errors else text.splitlines()[0])[:200]
        else:
            reason = text.splitlines()[0][:200]
        entry.update(outcome="refused at create", reasons=[reason])
    entry["create_seconds"] = round(time.monotonic() - t, 1)
    return entry


class Failed(Exception):
    """A patch went wrong in the VM: livesplice's fault, the guest is not to be trusted after."""


class Guest:
    """The VM the patches are tried in, booted when first needed and again after a failure."""

    def __init__(self, exchange: Path, kernel: str):
        self.exchange, self.kernel = exchange, kernel
        self.session: Session | None = None
        self.boots = 0

    def get(self) -> Session:
        if self.session is None:
            self.session = Session(kernel=self.kernel, rwdirs=[str(self.exchange)])
            self.session.start()
            self.boots += 1
        return self.session

    def drop(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = None

    # helpers on the running guest

    def cli(self, *args: str) -> tuple[int, str, str]:
        """Status, stdout and the error: with --json a command's error is its JSON on stdout."""
        r = self.get().run([*CLI, *args], timeout=600, cwd=str(REPO))
        err = r.err.strip()
        if r.status != 0 and "--json" in args:
            try:
                answer = json.loads(r.out)
                err = "; ".join([answer["error"], *answer.get("reasons", [])])
            except (ValueError, KeyError, TypeError):
                err = f"{err} {r.out.strip()}".strip()
        return r.status, r.out, err

    def listed(self) -> list[dict]:
        """What `livesplice list --json` says is applied."""
        status, out, err = self.cli("list", "--json")
        if status != 0:
            raise Failed(f"list exited {status}: {err[:300]}")
        return json.loads(out or "[]")

    def states(self, update_id: str) -> dict[str, str]:
        for u in self.listed():
            if u["id"] == update_id:
                return {t["name"]: t["state"] for t in u["targets"]}
        return {}

    def clear_log(self) -> None:
        # Cleared rather than marked by line: many module loads fill the kernel's ring buffer.
        self.get().run(["dmesg", "-C"], check=True)

    def problems(self) -> list[str]:
        return self.get().dmesg_problems()

    def smoke(self, module: str | None) -> None:
        check = "ls / >/dev/null && cat /proc/version >/dev/null"
        if module:
            check += f" && test -e /sys/module/{module}/initstate"
        r = self.get().run(["sh", "-c", check], timeout=120)
        if r.status != 0:
            raise Failed(f"smoke check exited {r.status}: {r.err.strip()[:200]}")

    def loaded(self, module: str) -> bool:
        return self.get().run(["test", "-e", f"/sys/module/{module}/initstate"]).status == 0

    def modprobe(self, module: str) -> tuple[int, str]:
        r = self.get().run(["modprobe", module], timeout=180)
        return r.status, (r.err or r.out).strip()

    def unload(self, module: str) -> str | None:
        """Unload the module and what it alone pulled in; why not, if it stays loaded."""
        r = self.get().run(["modprobe", "-r", module], timeout=180)
        if self.loaded(module):
            return (r.err or r.out).strip()[:200] or f"modprobe -r exited {r.status}"
        return None

    def apply(self, e: dict) -> dict | None:
        """Apply e's package; its `apply --json`, or None when it was refused cleanly (e is
        then marked refused at apply)."""
        status, out, err = self.cli("apply", e["package"], "--json")
        if status == 0:
            return json.loads(out)
        left = [u["id"] for u in self.listed()]
        problems = self.problems()
        if status == 3 and not problems and not left:
            # A refusal must leave the kernel exactly as it was: nothing listed, dmesg clean.
            e.update(outcome="refused at apply", reasons=[err])
            return None
        raise Failed(f"apply exited {status}: {err[:300]}; dmesg {problems[:3]}; left applied {left}")

    def undo(self, e: dict) -> None:
        status, _, err = self.cli("undo", e["id"])
        if e.get("callbacks"):
            # New code whose functions' addresses it takes: undo refuses without --force (a
            # queued callback would run freed code). Check that, then force it, as a user who
            # knows none is queued would; the kernel log is checked after.
            if status != 3 or "--force" not in err:
                raise Failed(f"undo of an update with callbacks {e['callbacks']} exited {status}, "
                             f"not refused: {err[:200]}")
            status, _, err = self.cli("undo", "--force", e["id"])
        left = [u["id"] for u in self.listed()]
        problems = self.problems()
        if status != 0 or problems or left:
            raise Failed(f"undo exited {status} {err[:200]}; dmesg {problems[:3]}; left applied {left}")


def try_vmlinux(guest: Guest, e: dict) -> None:
    guest.clear_log()
    applied = guest.apply(e)
    if applied is None:
        return
    e["pause_ms"] = round(applied["pause_ns"] / 1e6, 3)
    live = [u["id"] for u in guest.listed()]
    if live != [e["id"]]:
        raise Failed(f"listed after apply: {live}")
    guest.smoke(None)
    guest.undo(e)
    e["outcome"] = APPLIED


def load_module(guest: Guest, module: str) -> str | None:
    """Load the module into a clean guest; why it cannot be, if so. A module that breaks the
    guest by itself, before livesplice does anything, is the stock kernel's and the VM's matter:
    the guest is started anew."""
    guest.clear_log()
    try:
        status, message = guest.modprobe(module)
    except CommandTimeout:
        guest.drop()
        return "modprobe timed out"
    except GuestError as exc:
        guest.drop()
        return f"modprobe broke the guest: {type(exc).__name__}"
    problems = guest.problems()
    if problems:
        guest.drop()
        return f"loads with kernel log problems: {problems[0][:160]}"
    if status != 0:
        return f"modprobe exited {status}: {message[:200]}"
    if not guest.loaded(module):
        return f"modprobe exited 0 but /sys/module/{module} is not there"
    return None


def try_module(guest: Guest, e: dict, before_load: bool) -> None:
    module = e["target"]
    why = load_module(guest, module)
    if why is not None:
        e.update(outcome=NOT_LOADABLE, reasons=[why])
        return
    guest.clear_log()
    applied = guest.apply(e)
    if applied is None:
        guest.unload(module)
        return
    e["pause_ms"] = round(applied["pause_ns"] / 1e6, 3)
    states = guest.states(e["id"])
    if states != {module: "patched"}:
        raise Failed(f"targets after apply with {module} loaded: {states}")
    guest.smoke(module)
    guest.undo(e)
    e["outcome"] = APPLIED
    stays = guest.unload(module)
    if stays:
        e["unload"] = stays
    if not before_load:
        return
    if stays:
        e["before_load"] = f"not tried: {module} cannot be unloaded ({stays})"
        return
    guest.clear_log()
    applied = guest.apply(e)
    if applied is None:
        raise Failed(f"refused at apply with {module} not loaded, applied with it loaded: "
                     f"{e['reasons'][0][:200]}")
    before = {t["name"]: t["state"] for t in applied["targets"]}
    states = guest.states(e["id"])
    if before != {module: "waiting"} or states != {module: "waiting"}:
        raise Failed(f"targets after apply with {module} not loaded: apply {before}, list {states}")
    status, message = guest.modprobe(module)
    states = guest.states(e["id"])
    if status != 0 or states != {module: "patched"}:
        raise Failed(f"modprobe {module} with the update waiting exited {status} ({message[:200]}); "
                     f"targets {states}; dmesg {guest.problems()[:3]}")
    guest.smoke(module)
    guest.undo(e)
    e["before_load"] = APPLIED
    guest.unload(module)


def note_loadable(guest: Guest, e: dict) -> None:
    """For a module patch refused at create: whether its module loads in the VM (the share the
    target is about counts only patches whose module does)."""
    why = load_module(guest, e["target"])
    e["module_loads"] = why is None
    if why is None:
        guest.unload(e["target"])


def try_in_vm(guest: Guest, e: dict, before_load: bool) -> None:
    t = time.monotonic()
    try:
        if e["outcome"] == "created":
            if e["target"] == VMLINUX:
                try_vmlinux(guest, e)
            else:
                try_module(guest, e, before_load)
        elif e["outcome"] == "refused at create" and e["target"] != VMLINUX and in_share(e):
            note_loadable(guest, e)
    except Failed as exc:
        e.update(outcome="failed", reasons=[str(exc)])
        guest.drop()
    except (GuestError, CommandTimeout) as exc:
        e.update(outcome="failed", reasons=[f"{type(exc).__name__}: {str(exc)[:300]}"])
        guest.drop()
    e["vm_seconds"] = round(time.monotonic() - t, 1)


def in_share(e: dict) -> bool:
    """Whether a patch counts in the share the target is about: it builds alone, changes code
    but no data, and (a module's) its module loads in the VM."""
    if e["outcome"] in ("nothing to do", NOT_LOADABLE) or e.get("module_loads") is False:
        return False
    return not any(key in r for r in e.get("reasons", []) for key in OUTSIDE_SHARE)


# --- state and reports -----------------------------------------------------------------------

def read_state(path: Path) -> dict[str, dict]:
    """File -> its latest result in the state file (a line cut short by a kill is skipped)."""
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[entry["file"]] = entry
    return done


def summary(entries: list[dict]) -> dict:
    counts = Counter(e["outcome"] for e in entries)
    reasons = Counter(short_reason(r) for e in entries
                      if e["outcome"].startswith(("refused", "failed")) or e["outcome"] == NOT_LOADABLE
                      for r in e.get("reasons", [])[:1])
    share = [e for e in entries if in_share(e)]
    applied = counts[APPLIED]
    out = {"counts": dict(counts), "reasons": dict(reasons), "in_share": len(share),
           "applied": applied, "applied_share": round(applied / len(share), 3) if share else None}
    before = Counter(e["before_load"] for e in entries if "before_load" in e)
    if before:
        out["before_load"] = dict(before)
    pauses = [e["pause_ms"] for e in entries if "pause_ms" in e]
    if pauses:
        out["pause_ms_median"] = round(statistics.median(pauses), 3)
    timed = [e for e in entries if "vm_seconds" in e]  # rows from before the VM time was kept lack it
    if timed:
        out["seconds_per_file"] = round(statistics.mean(
            e["create_seconds"] + e["vm_seconds"] for e in timed), 1)
        out["create_seconds_median"] = round(statistics.median(e["create_seconds"] for e in timed), 1)
        out["vm_seconds_median"] = round(statistics.median(e["vm_seconds"] for e in timed), 1)
    return out


def table(entries: list[dict], title: str, what: str, total: int) -> list[str]:
    s = summary(entries)
    lines = [f"## {title}", ""]
    if "seconds_per_file" in s:
        hours = s["seconds_per_file"] * total / 3600
        lines += [f"Time: {s['seconds_per_file']} s per file on average (create and VM; medians "
                  f"{s['create_seconds_median']} s and {s['vm_seconds_median']} s): all {total} files "
                  f"would take about {hours:.1f} h on this machine.", ""]
    lines += ["| outcome | patches |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(s["counts"].items())]
    lines += ["", f"Of the {s['in_share']} patches that build alone and change code but no data"
              f"{what}, {s['applied']} were applied and undone "
              f"({100 * s['applied'] / max(1, s['in_share']):.0f}%)."]
    if "before_load" in s:
        lines += ["", "Applied before the module was loaded (then loaded, checked and undone): "
                  + ", ".join(f"{v} {k}" for k, v in sorted(s["before_load"].items())) + "."]
    lines += ["", "| reason (first of each refusal, failure or module that does not load) | patches |",
              "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in Counter(s["reasons"]).most_common()]
    modules = any(e["target"] != VMLINUX for e in entries)
    head = "| file | module " if modules else "| file "
    lines += ["", head + "| outcome | functions | create s | pause ms | "
              + ("before load | " if modules else "") + "reason |",
              "|---|" + ("---|" if modules else "") + "---|---|---|---|" + ("---|" if modules else "")
              + "---|"]
    for e in entries:
        reason = (e.get("reasons") or [""])[0].replace("|", "/").replace("\n", " ")[:140]
        if e["outcome"] == "refused at create" and e.get("module_loads") is False:
            reason = "(module does not load in the VM) " + reason
        row = f"| {e['file']} | " + (f"{e['target']} | " if modules else "")
        row += (f"{e['outcome']} | {', '.join(e.get('functions', []))[:80]} | "
                f"{e['create_seconds']} | {e.get('pause_ms', '')} | ")
        if modules:
            row += f"{e.get('before_load', '')[:60]} | "
        lines.append(row + f"{reason} |")
    return lines


def write_reports(entries: list[dict], prefix: Path, meta: dict) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for e in entries:
        e.setdefault("target", VMLINUX)  # rows from before module targets
    builtin = [e for e in entries if e["target"] == VMLINUX]
    modular = [e for e in entries if e["target"] != VMLINUX]
    meta.update(vmlinux=summary(builtin), modules=summary(modular), patches=entries)
    # Kept for readers of the report from before module targets: the vmlinux figures.
    meta.update(counts=meta["vmlinux"]["counts"], reasons=meta["vmlinux"]["reasons"],
                applied_share_of_data_free=meta["vmlinux"]["applied_share"])
    prefix.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    lines = [f"# Corpus: Debian {meta['from']} -> {meta['to']} on {meta['kernel']}", "",
             f"{meta['date']}, {meta['machine']}. {meta['scope']}", ""]
    totals = meta["totals"]
    lines += table(builtin, f"vmlinux ({len(builtin)} of {totals[VMLINUX]} files)", "", totals[VMLINUX])
    lines += [""] + table(modular, f"Modules ({len(modular)} of {totals['modules']} files)",
                          " and whose module loads in the VM", totals["modules"])
    # The data refusals rewritten with hooks, and those applied as they are, as
    # bench/hook-fixes/README.md and bench/data-fixes/README.md keep them.
    for kept in ("hook-fixes", "data-fixes"):
        readme = Path(__file__).with_name(kept) / "README.md"
        if readme.exists():
            lines += ["", readme.read_text().rstrip()]
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")


def select(items: list[CorpusFile], args: argparse.Namespace) -> list[CorpusFile]:
    if args.only:
        items = [i for i in items if i.file in args.only]
    if args.sample_every:
        items = items[::args.sample_every]
    if args.limit:
        items = items[:args.limit]
    return items


def spread_order(items: list[CorpusFile], passes: int = 4) -> list[CorpusFile]:
    """The order to run in: every `passes`-th file first, then the ones after them, and so on, so
    that what an interrupted run has done is spread over the whole list."""
    return [item for start in range(passes) for item in items[start::passes]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="old", default="6.1.187-1")
    parser.add_argument("--to", dest="new", default="6.1.190-1")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--modules", action="store_true", help="only the files built into modules")
    which.add_argument("--all", action="store_true", help="vmlinux's files and the modules'")
    parser.add_argument("--limit", type=int, help="only the first N files (after --sample-every)")
    parser.add_argument("--sample-every", type=int, metavar="K", help="only every K-th file")
    parser.add_argument("--only", nargs="*", help="only these files")
    parser.add_argument("--before-load", type=int, default=4, metavar="N",
                        help="apply every N-th created module package also before its module is "
                             "loaded (default 4; 0: never)")
    parser.add_argument("--resume", action="store_true",
                        help="skip the files the state file already has a result for (an "
                             "interrupted run of the same selection goes on)")
    parser.add_argument("--state", type=Path,
                        help="the state file (default: state-FROM-TO.jsonl in the cache's corpus/)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the reports from the state file's results")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "corpus")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the rows of the files run in the existing report "
                             "(to rerun what changed while iterating)")
    args = parser.parse_args()
    for name in ("limit", "sample_every", "before_load"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    running = debian.kernel_for_source_version(args.old)
    old_files = debian.fetch_kernel(running.abi)
    new_files = debian.fetch_kernel(debian.kernel_for_source_version(args.new).abi)
    old, new = old_files.source_tree, new_files.source_tree
    tree = WorkTree(old, old_files.config)
    with tree.locked():
        tree.sync_and_prepare()
        module_objects = tree.deps.modules()
    changed = changed_c_files(old, new)
    builtin, modular = corpus_files(changed, tree.objects.vmlinux_objects, module_objects)
    pool = modular if args.modules else builtin + modular if args.all else builtin
    files = select(pool, args)
    if args.only and (unknown := set(args.only) - {f.file for f in pool}):
        parser.error(f"--only: not changed files of this selection: {', '.join(sorted(unknown))}")

    exchange = debian.cache_root() / "corpus"
    exchange.mkdir(parents=True, exist_ok=True)
    state_path = args.state or exchange / f"state-{args.old}-{args.new}.jsonl"
    if not args.resume and not args.report_only and state_path.exists():
        state_path.replace(state_path.with_name(state_path.name + ".prev"))  # without --resume: anew
    done = read_state(state_path)
    guest = Guest(exchange, running.abi)
    t0 = time.monotonic()
    ran = 0
    created_modules = sum(1 for e in done.values() if e["target"] != VMLINUX and "package" in e)
    try:
        with state_path.open("a") as state:
            for i, item in enumerate(spread_order(files)):
                if item.file in done or args.report_only:
                    continue
                entry = classify_create(item, old, new, old_files.config, exchange)
                before_load = False
                if entry["outcome"] == "created" and item.target != VMLINUX:
                    created_modules += 1
                    before_load = bool(args.before_load) and created_modules % args.before_load == 0
                try_in_vm(guest, entry, before_load)
                state.write(json.dumps(entry) + "\n")
                state.flush()
                done[item.file] = entry
                ran += 1
                print(f"[{i + 1}/{len(files)}] {item.file} ({item.target}): {entry['outcome']} "
                      f"create {entry['create_seconds']} s, VM {entry['vm_seconds']} s "
                      f"{entry.get('pause_ms', '')} {entry.get('before_load', '')} "
                      f"{(entry.get('reasons') or [''])[0][:160]}", file=sys.stderr, flush=True)
    finally:
        guest.drop()
    elapsed = time.monotonic() - t0

    entries = [done[f.file] for f in files if f.file in done]
    previous = args.out.with_suffix(".json")
    history = []
    if args.merge and previous.exists():
        old_meta = json.loads(previous.read_text())
        history = old_meta.get("history", [])
        rerun = {e["file"] for e in entries}
        entries = sorted([e for e in old_meta["patches"] if e["file"] not in rerun] + entries,
                         key=lambda e: (e.get("target", VMLINUX) != VMLINUX, e["file"]))
    if ran:
        history.append({"date": time.strftime("%Y-%m-%d"), "files": ran, "seconds": round(elapsed),
                        "boots": guest.boots})
    scope = (f"{len(changed)} .c files changed; {len(builtin)} are built into vmlinux and "
             f"{len(modular)} into modules (kbuild's object lists for the stock config); "
             f"{len(entries)} in these tables, from "
             + ", then ".join(f"{h['files']} files in {h['seconds']} s" for h in history) + ".")
    meta = {"from": args.old, "to": args.new, "kernel": running.abi,
            "date": time.strftime("%Y-%m-%d"), "scope": scope, "history": history,
            "totals": {VMLINUX: len(builtin), "modules": len(modular)},
            "machine": f"{platform.node()} ({os.cpu_count()} cpus, QEMU/TCG guest)"}
    write_reports(entries, args.out, meta)
    print(scope)
    print("vmlinux:", meta["vmlinux"]["counts"], "modules:", meta["modules"]["counts"])


if __name__ == "__main__":
    main()
