#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then a small label-noise deep matrix factorization run
# (Gatmiry et al. --quick: d=20, n=200, rank 2, depths 2 and 3, label-noise vs plain SGD), wandb offline,
# writing the figures and results.json to outputs/gatmiry2023_quick/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export WANDB_MODE="${WANDB_MODE:-offline}"
exec .venv/bin/python examples/gatmiry2023/run.py --quick "$@"
