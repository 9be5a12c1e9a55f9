#!/usr/bin/env bash
# README's test command: set up (idempotent), then run the whole suite, VM tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
