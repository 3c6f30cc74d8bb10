#!/usr/bin/env bash
# Create .venv (if needed) with the CPU build of torch first, then lightning-flat and its [dev] and [ray] extras
# (the test suite runs the Ray sweep tests on a local Ray), every package at the version requirements/lock.txt pins
# (scripts/lock.sh writes it), so that every fresh machine gets the same environment.
# Idempotent: reinstalls only when pyproject.toml or the lock changed. PYTHON picks the interpreter.
# --no-lock installs without the lock (newest releases; scripts/lock.sh uses it before compiling a new lock).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-python3}"
lock=(-c requirements/lock.txt)
[ "${1:-}" = "--no-lock" ] && lock=()
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.lightning-flat-installed"
want="$(cat pyproject.toml requirements/lock.txt | sha256sum | cut -d' ' -f1)${lock[*]:+ locked}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setting up .venv (CPU torch, then lightning-flat[dev,ray]) ..." >&2
    # CPU torch first, with pip (it takes the local CPU build): a bare `torch` requirement would pull a multi-GB
    # CUDA build. The package's own `torch>=2.3` is then already satisfied.
    .venv/bin/python -m pip install --quiet torch==2.13.0 "${lock[@]}"
    # The rest with uv when it can be had (about 10x faster than pip here), else with pip.
    if .venv/bin/python -m pip install --quiet uv==0.13.9 \
        && VIRTUAL_ENV="$root/.venv" .venv/bin/uv pip install --quiet -e ".[dev,ray]" "${lock[@]}"; then
        :
    else
        .venv/bin/python -m pip install --quiet -e ".[dev,ray]" "${lock[@]}"
    fi
    .venv/bin/python -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ or not torch.cuda.is_available() else 1)" \
        || { echo "setup: torch is not the CPU build" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
