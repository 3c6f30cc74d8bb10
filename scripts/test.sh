#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, then pytest (wandb offline). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export WANDB_MODE=offline
exec .venv/bin/python -m pytest "$@"
