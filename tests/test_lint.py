"""Style and types are part of the test command: ruff on the code, tests and benches, mypy on the
package (configured in pyproject.toml). No kernel needed."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff():
    r = run(str(BIN / "ruff"), "check", "livesplice", "tests", "bench", "ansible")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy():
    r = run(str(BIN / "mypy"))
    assert r.returncode == 0, r.stdout + r.stderr
