#!/usr/bin/env python3
"""How many real kernel fixes livesplice can apply: every .c file that changed between two Debian
source versions and is built into the running stock kernel's vmlinux becomes one patch; each is
created, and each created one is applied, smoke-checked and undone in the VM.

Run as root after scripts/setup.sh:
  .venv/bin/python bench/corpus.py [--from 6.1.187-1] [--to 6.1.190-1] [--limit N] [--only FILE...]
Writes docs/corpus.md and docs/corpus.json (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from livesplice import debian
from livesplice.build import WorkTree
from livesplice.create import create
from livesplice.errors import LivespliceError, NothingToDo, Refused
from livesplice.patches import file_patch
from livesplice.testbed import CommandTimeout, GuestError, Session

REPO = Path(__file__).resolve().parent.parent


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


def short_reason(reason: str) -> str:
    """A reason without the names in it, for counting."""
    for key in ("changed data object", "changed layout of", "changed __init function",
                "cannot redirect changed function", "Kconfig or Makefiles", "assembly code",
                "anonymous writable data", "does not match the running kernel",
                "not in /proc/kallsyms", "identical functions of that name", "code busy",
                "does not build alone", "symbols this kernel does not have", "no function's object code"):
        if key in reason:
            return key
    return reason[:60]


def classify_create(rel: str, old: Path, new: Path, config: Path, out_dir: Path, index: int) -> dict:
    patch = file_patch(rel, (old / rel).read_text(errors="replace"),
                       (new / rel).read_text(errors="replace"))
    entry: dict = {"file": rel, "id": f"c{index:04d}", "patch_lines": patch.count("\n")}
    t = time.monotonic()
    try:
        result = create(old, config, patch, entry["id"], out_dir / f"{entry['id']}.tar.gz")
        entry.update(outcome="created", package=str(result.path),
                     functions=[r.name for r in result.package.manifest.replaced],
                     new=[n.name for n in result.package.manifest.new])
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


CLI = [sys.executable, "-m", "livesplice"]


def applied_ids(session: Session) -> list[str]:
    """What `livesplice list` says is applied in the guest."""
    r = session.run([*CLI, "list", "--json"], timeout=120, cwd=str(REPO))
    return [u["id"] for u in json.loads(r.out or "[]")]


def run_in_vm(entries: list[dict], exchange: Path, kernel: str) -> None:
    todo = [e for e in entries if e["outcome"] == "created"]
    session = None
    try:
        for e in todo:
            if session is None:
                session = Session(kernel=kernel, rwdirs=[str(exchange)])
                session.start()
            mark = len(session.dmesg().splitlines())
            try:
                r = session.run([*CLI, "apply", e["package"], "--json"], timeout=600, cwd=str(REPO))
                if r.status != 0:
                    # A refusal must leave the kernel exactly as it was: nothing listed, dmesg clean.
                    left = applied_ids(session)
                    problems = session.dmesg_problems(mark)
                    if r.status == 3 and not problems and not left:
                        e.update(outcome="refused at apply", reasons=[r.err.strip()])
                        continue
                    e.update(outcome="failed", reasons=[
                        f"apply exited {r.status}: {r.err.strip()[:300]}; dmesg {problems[:3]}; "
                        f"left applied {left}"])
                    session.close()
                    session = None
                    continue
                e["pause_ms"] = round(json.loads(r.out)["pause_ns"] / 1e6, 3)
                live = applied_ids(session)
                smoke = session.run(["sh", "-c", "ls / >/dev/null && cat /proc/version"], timeout=120)
                u = session.run([*CLI, "undo", e["id"]], timeout=600, cwd=str(REPO))
                problems = session.dmesg_problems(mark)
                left = applied_ids(session)
                if live != [e["id"]] or smoke.status != 0 or u.status != 0 or problems or left:
                    e.update(outcome="failed", reasons=[
                        f"listed after apply {live}, smoke {smoke.status}, undo {u.status} "
                        f"{u.err.strip()[:200]}, dmesg {problems[:3]}, left applied {left}"])
                    session.close()
                    session = None
                    continue
                e["outcome"] = "applied and undone"
            except (GuestError, CommandTimeout) as exc:
                e.update(outcome="failed", reasons=[f"{type(exc).__name__}: {exc}"])
                if session is not None:
                    session.close()
                session = None
            finally:
                print(f"{e['file']}: {e['outcome']} {e.get('pause_ms', '')} "
                      f"{(e.get('reasons') or [''])[0][:160]}", file=sys.stderr, flush=True)
    finally:
        if session is not None:
            session.close()


def write_reports(entries: list[dict], prefix: Path, meta: dict) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    counts = Counter(e["outcome"] for e in entries)
    reasons = Counter(short_reason(r) for e in entries if e["outcome"].startswith(("refused", "failed"))
                      for r in e.get("reasons", [])[:1])
    # The share the target is about: patches that build on their own, change object code and
    # change no data.
    data_free = [e for e in entries if e["outcome"] != "nothing to do" and not any(
        key in r for r in e.get("reasons", [])
        for key in ("changed data object", "changed layout", "does not build alone"))]
    applied = counts["applied and undone"]
    meta.update(counts=dict(counts), reasons=dict(reasons), patches=entries,
                applied_share_of_data_free=round(applied / len(data_free), 3) if data_free else None)
    prefix.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    lines = [f"# Corpus: Debian {meta['from']} -> {meta['to']} on {meta['kernel']}", "",
             f"{meta['date']}, {meta['machine']}. {meta['scope']}", "",
             "| outcome | patches |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    lines += ["", f"Of the {len(data_free)} patches that build alone and change code but no data, "
              f"{applied} were "
              f"applied and undone ({100 * applied / max(1, len(data_free)):.0f}%).", "",
              "| reason (first of each refusal or failure) | patches |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in reasons.most_common()]
    lines += ["", "| file | outcome | functions | create s | pause ms | reason |",
              "|---|---|---|---|---|---|"]
    for e in entries:
        reason = (e.get("reasons") or [""])[0].replace("|", "/").replace("\n", " ")[:140]
        lines.append(f"| {e['file']} | {e['outcome']} | {', '.join(e.get('functions', []))[:80]} | "
                     f"{e['create_seconds']} | {e.get('pause_ms', '')} | {reason} |")
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--from", dest="old", default="6.1.187-1")
    parser.add_argument("--to", dest="new", default="6.1.190-1")
    parser.add_argument("--limit", type=int, help="only the first N built-in files")
    parser.add_argument("--only", nargs="*", help="only these files")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "corpus")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the rows of the files run in the existing report "
                             "(to rerun what changed while iterating)")
    args = parser.parse_args()
    running = debian.kernel_for_source_version(args.old)
    old_files = debian.fetch_kernel(running.abi)
    new_files = debian.fetch_kernel(debian.kernel_for_source_version(args.new).abi)
    old, new = old_files.source_tree, new_files.source_tree
    tree = WorkTree(old, old_files.config)
    with tree.locked():
        tree.sync_and_prepare()
    builtin_sources = {o[:-2] + ".c" for o in tree.objects.vmlinux_objects}
    changed = changed_c_files(old, new)
    builtin_changed = [f for f in changed if f in builtin_sources]
    files = list(builtin_changed)
    if args.only:
        files = [f for f in files if f in args.only]
    if args.limit:
        files = files[:args.limit]
    exchange = debian.cache_root() / "corpus"
    exchange.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    entries = []
    for i, rel in enumerate(files):
        # The id is the file's place in the whole list, so reruns of a subset keep their ids.
        entry = classify_create(rel, old, new, old_files.config, exchange, builtin_changed.index(rel))
        print(f"[{i + 1}/{len(files)}] {rel}: {entry['outcome']} ({entry['create_seconds']} s)",
              file=sys.stderr, flush=True)
        entries.append(entry)
    run_in_vm(entries, exchange, running.abi)
    elapsed = time.monotonic() - t0
    n_builtin = len(builtin_changed)
    previous = args.out.with_suffix(".json")
    history = []
    if args.merge and previous.exists():
        old_meta = json.loads(previous.read_text())
        history = old_meta.get("history", [])
        rerun = {e["file"] for e in entries}
        entries = sorted([e for e in old_meta["patches"] if e["file"] not in rerun] + entries,
                         key=lambda e: e["file"])
    if files:
        history.append({"date": time.strftime("%Y-%m-%d"), "files": len(files),
                        "seconds": round(elapsed)})
    scope = (f"{len(changed)} .c files changed; {n_builtin} are built into vmlinux (kbuild's object "
             f"list for the stock config); {len(entries)} in this table, from "
             + ", then ".join(f"{h['files']} files in {h['seconds']} s" for h in history) + ".")
    meta = {"from": args.old, "to": args.new, "kernel": running.abi,
            "date": time.strftime("%Y-%m-%d"), "scope": scope, "history": history,
            "machine": f"{platform.node()} ({os.cpu_count()} cpus, QEMU/TCG guest)"}
    write_reports(entries, args.out, meta)
    print(scope)
    print(dict(Counter(e["outcome"] for e in entries)))


if __name__ == "__main__":
    main()
