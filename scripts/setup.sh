#!/usr/bin/env bash
# Create .venv (if needed) with the CPU build of torch first, then lightning-flat and its [dev] extras.
# Idempotent: reinstalls only when pyproject.toml changed. Source it or run it; PYTHON picks the interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.lightning-flat-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet torch==2.13.0
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
fi
