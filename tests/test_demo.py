"""README's first command's main job, end to end: `livesplice demo` on the default stock kernel."""

from conftest import livesplice_cli


def test_demo_runs_the_whole_story(stock_kernel):
    proc = livesplice_cli("demo", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "replaces: prctl_set_auxv" in out
    assert "fixed: /proc/self/auxv now lists 1 entry" in out
    assert "livesplice demo: cat[" in out
    assert "kernel log            │ clean" in out or "clean" in out.split("kernel log", 1)[1][:80]
