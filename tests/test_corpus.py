"""A small fixed sample of the real-fix corpus (bench/corpus.py), so the benchmark cannot rot.

Each file is a real change between Debian's 6.1.187-1 and 6.1.190-1 sources, run exactly as the
benchmark runs it: create against 6.1.187-1, then apply, smoke check and undo in the VM with the
stock 6.1.0-53-amd64 kernel. The sample holds one file of each class of bug the corpus found;
the module sample one file of each outcome of module code (module loaded first, and applied before
its module loads).
"""

import json
import subprocess
import sys

from conftest import REPO

EXPECTED = {
    # Format strings passed as sign-extended absolute addresses (mov $str, %esi).
    "drivers/acpi/acpica/psargs.c": "applied and undone",
    # cmpb $0, var(%rip): a RIP-relative reference with a trailing immediate.
    "drivers/acpi/processor_core.c": "applied and undone",
    # A __FILE__ string behind a .LC label.
    "fs/exec.c": "applied and undone",
    # Init code that uses the same static data as the changed function.
    "block/genhd.c": "applied and undone",
    # A renumbered __func__ and a changed dynamic debug descriptor: copies in the new code.
    "drivers/base/core.c": "applied and undone",
    # Init code changed: refused, naming it.
    "drivers/input/keyboard/atkbd.c": "refused at create",
}


def test_corpus_sample(stock_kernel, tmp_path):
    out = tmp_path / "corpus"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "corpus.py"), "--out", str(out),
                           "--only", *EXPECTED], capture_output=True, text=True, timeout=3000,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    outcomes = {e["file"]: e for e in report["patches"]}
    assert set(outcomes) == set(EXPECTED)
    for rel, expected in EXPECTED.items():
        assert outcomes[rel]["outcome"] == expected, (rel, outcomes[rel])
    assert "changed __init function atkbd_init" in outcomes[
        "drivers/input/keyboard/atkbd.c"]["reasons"][0]
    assert all(e["pause_ms"] > 0 for e in outcomes.values() if e["outcome"] == "applied and undone")
    table = out.with_suffix(".md").read_text()
    assert "| applied and undone | 5 |" in table


MODULES_EXPECTED = {
    # A module fix applied with the module loaded, and (--before-load 1) before it loads.
    "drivers/net/veth.c": "applied and undone",
    # A module whose hardware the VM lacks: modprobe fails, its own outcome.
    "arch/x86/events/intel/uncore.c": "module does not load in the VM",
    # A changed driver structure (data): refused at create, outside the share the target is about.
    "drivers/hwmon/adt7462.c": "refused at create",
}


def test_corpus_module_sample(stock_kernel, tmp_path):
    out = tmp_path / "corpus"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "corpus.py"), "--modules", "--out",
                           str(out), "--state", str(tmp_path / "state.jsonl"), "--before-load", "1",
                           "--only", *MODULES_EXPECTED], capture_output=True, text=True,
                          timeout=3000, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    outcomes = {e["file"]: e for e in report["patches"]}
    assert {rel: e["outcome"] for rel, e in outcomes.items()} == MODULES_EXPECTED, outcomes
    veth = outcomes["drivers/net/veth.c"]
    assert veth["target"] == "veth" and veth["before_load"] == "applied and undone", veth
    assert veth["pause_ms"] > 0
    assert "No such device" in outcomes["arch/x86/events/intel/uncore.c"]["reasons"][0]
    assert report["modules"]["applied_share"] == 1.0
    assert "changed data object adt7462_driver" in outcomes["drivers/hwmon/adt7462.c"]["reasons"][0]
    # The state file has one line per file: a rerun with --resume does nothing more.
    assert len((tmp_path / "state.jsonl").read_text().splitlines()) == 3
