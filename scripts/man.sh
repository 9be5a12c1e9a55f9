#!/usr/bin/env bash
# Man pages for livesplice and each of its commands (livesplice.1, livesplice-apply.1,
# livesplice-vm-run.1, ...), made by click-man from the command line's own help, into DIR
# (default: build/man). To install them: scripts/man.sh /usr/local/share/man/man1
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
target=${1:-build/man}
mkdir -p "$target"
"$python" - "$target" <<'PY'
import sys

from click_man.core import write_man_pages

from livesplice import __version__
from livesplice.cli import main

write_man_pages("livesplice", main, version=__version__, target_dir=sys.argv[1])
PY
echo "man pages in $target"
