"""bench/corpus.py's bookkeeping, without the kernel: which files are whose, the state file an
interrupted run resumes from, the share the target is about, and the two report tables."""

import importlib.util
import json
import sys

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("corpus", REPO / "bench" / "corpus.py")
assert spec is not None and spec.loader is not None
corpus = importlib.util.module_from_spec(spec)
sys.modules["corpus"] = corpus  # dataclasses look their module up there
spec.loader.exec_module(corpus)


def test_files_split_into_vmlinux_and_modules_with_stable_ids():
    changed = ["a/x.c", "b/y.c", "c/z-mod.c", "d/none.c"]
    builtin, modular = corpus.corpus_files(changed, {"a/x.o"}, {"b/y.o": "b/ymod",
                                                                 "c/z-mod.o": "c/z-mod"})
    assert [(f.file, f.target, f.id) for f in builtin] == [("a/x.c", "vmlinux", "c0000")]
    assert [(f.file, f.target, f.id) for f in modular] == [("b/y.c", "ymod", "m0000"),
                                                           ("c/z-mod.c", "z_mod", "m0001")]


def test_state_keeps_the_latest_result_and_skips_a_cut_line(tmp_path):
    state = tmp_path / "state.jsonl"
    state.write_text(json.dumps({"file": "a.c", "outcome": "failed"}) + "\n"
                     + json.dumps({"file": "a.c", "outcome": "applied and undone"}) + "\n"
                     + '{"file": "b.c", "outc')
    assert corpus.read_state(state) == {"a.c": {"file": "a.c", "outcome": "applied and undone"}}
    assert corpus.read_state(tmp_path / "none.jsonl") == {}


def entry(file, outcome, target="m", reason=None, **more):
    e = {"file": file, "target": target, "outcome": outcome, "create_seconds": 5.0, **more}
    if reason:
        e["reasons"] = [reason]
    return e


ENTRIES = [
    entry("v1.c", "applied and undone", "vmlinux", pause_ms=0.7, vm_seconds=3.0),
    entry("v2.c", "refused at create", "vmlinux", "v2.o: changed data object x"),
    entry("m1.c", "applied and undone", pause_ms=1.0, vm_seconds=20.0, before_load="applied and undone"),
    entry("m2.c", "module does not load in the VM", reason="modprobe exited 1: modprobe: ERROR: "
          "could not insert 'm': No such device", vm_seconds=5.0),
    entry("m3.c", "refused at create", reason="m3.o: changed __init function f", module_loads=True),
    entry("m4.c", "refused at create", reason="m4.o: changed __init function g", module_loads=False),
    entry("m5.c", "refused at create", reason="does not build alone: error: x"),
    entry("m6.c", "nothing to do", reason="no function's object code changed"),
    entry("m7.c", "failed", reason="undo exited 1"),
]


def test_share_counts_what_builds_alone_changes_no_data_and_loads():
    assert [e["file"] for e in ENTRIES if corpus.in_share(e)] == ["v1.c", "m1.c", "m3.c", "m7.c"]
    s = corpus.summary([e for e in ENTRIES if e["target"] != "vmlinux"])
    assert (s["in_share"], s["applied"], s["applied_share"]) == (3, 1, 0.333)
    assert s["before_load"] == {"applied and undone": 1}
    assert s["reasons"]["modprobe: No such device"] == 1
    assert s["seconds_per_file"] == pytest.approx(17.5)


def test_reports_have_a_vmlinux_and_a_module_table(tmp_path):
    meta = {"from": "1", "to": "2", "kernel": "k", "date": "d", "scope": "s", "machine": "m",
            "totals": {"vmlinux": 190, "modules": 778}}
    corpus.write_reports([dict(e) for e in ENTRIES], tmp_path / "corpus", meta)
    text = (tmp_path / "corpus.md").read_text()
    vmlinux, modules = text.split("## Modules")
    assert "## vmlinux (2 of 190 files)" in vmlinux and "| applied and undone | 1 |" in vmlinux
    assert "Of the 1 patches that build alone" in vmlinux
    assert "(7 of 778 files)" in modules and "| module does not load in the VM | 1 |" in modules
    assert "and whose module loads in the VM, 1 were applied and undone (33%)" in modules
    assert "| m1.c | m | applied and undone |" in modules
    assert "(module does not load in the VM) m4.o: changed __init" in modules
    report = json.loads((tmp_path / "corpus.json").read_text())
    assert report["modules"]["counts"]["failed"] == 1
    assert report["applied_share_of_data_free"] == 1.0  # vmlinux's, as before module targets


def test_spread_order_runs_every_file_once_spread_first():
    items = [corpus.CorpusFile(f"f{i}.c", "m", f"m{i:04d}") for i in range(10)]
    order = [f.file for f in corpus.spread_order(items)]
    assert sorted(order) == sorted(f.file for f in items)
    assert order[:3] == ["f0.c", "f4.c", "f8.c"]
