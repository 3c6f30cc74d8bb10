#!/usr/bin/env bash
# Test both ends of the supported versions (not part of the default suite or CI: torch comes from PyPI here as a CUDA
# build, a few GB per venv).
#
#   bash scripts/test_versions.sh                  # both: oldest, then newest
#   bash scripts/test_versions.sh oldest [ARGS]    # one of them; ARGS go to pytest (e.g. -x, -k resume)
#
# oldest: every dependency in pyproject.toml (runtime and [dev]) pinned at its lower bound (name>=X installs X); what
#         they depend on in turn resolves to its newest compatible release.
# newest: every dependency at its newest release (upgraded on each run, so a new release is picked up).
# Each venv is kept under $LIGHTNING_FLAT_VERSIONS_DIR (default ~/.cache/lightning-flat/versions) and reused: oldest
# is rebuilt only when the lower bounds change, newest is upgraded in place. The project itself is installed editable
# from this checkout. Each run appends its versions and pytest's closing line to last-result.txt there.
# Needs uv, taken from .venv (which scripts/setup.sh creates).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
which="${1:-both}"
[ $# -gt 0 ] && shift
case "$which" in
    oldest|newest) sets=("$which") ;;
    both) sets=(oldest newest) ;;
    *) echo "test_versions.sh: the first argument must be oldest, newest or both, got '$which'" >&2; exit 2 ;;
esac
# The engine, callback (resume and DDP included), CLI, docs and install-check tests, and the quickstart's job.
TESTS=(tests/engine tests/callbacks tests/test_cli.py tests/test_docs.py tests/test_install.py
       tests/examples/test_gatmiry2023_quick.py)
PYTHON="${PYTHON:-python3}"
dir="${LIGHTNING_FLAT_VERSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning-flat/versions}"
mkdir -p "$dir"
bash scripts/setup.sh
uv=("$root/.venv/bin/uv" pip install --quiet)

status=0
for set in "${sets[@]}"; do
    venv="$dir/$set"
    t0=$(date +%s)
    if [ "$set" = oldest ]; then
        "$PYTHON" scripts/lower_bounds.py > "$dir/oldest-constraints.txt"
        want="$(sha256sum "$dir/oldest-constraints.txt" | cut -d' ' -f1)"
        if [ ! -f "$venv/.lightning-flat-installed" ] || [ "$(cat "$venv/.lightning-flat-installed")" != "$want" ]; then
            echo "== $set: installing pyproject.toml's lower bounds into $venv ..." >&2
            rm -rf "$venv"
            "$PYTHON" -m venv "$venv"
            VIRTUAL_ENV="$venv" "${uv[@]}" -c "$dir/oldest-constraints.txt" -e ".[dev]"
            echo "$want" > "$venv/.lightning-flat-installed"
        else
            VIRTUAL_ENV="$venv" "${uv[@]}" --no-deps -e .
        fi
    else
        echo "== $set: installing or upgrading to the newest releases in $venv ..." >&2
        [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
        VIRTUAL_ENV="$venv" "${uv[@]}" --upgrade -e ".[dev]"
    fi
    versions="$("$venv/bin/python" scripts/lower_bounds.py --installed)"
    echo "== $set: $versions (install $(( $(date +%s) - t0 )) s)" >&2
    t0=$(date +%s)
    set +e
    WANDB_MODE=offline "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@" | tee "$dir/$set.log"
    rc=${PIPESTATUS[0]}
    set -e
    summary="$(grep -E '(passed|failed|error).* in [0-9.]+s' "$dir/$set.log" | tail -1 | tr -d '=' \
        | sed 's/^ *//;s/ *$//')"
    line="$(date -u +%Y-%m-%d) $set: $versions: ${summary:-no closing line, exit $rc} (tests $(( $(date +%s) - t0 )) s)"
    echo "$line" >> "$dir/last-result.txt"
    echo "== $line" >&2
    [ "$rc" -eq 0 ] || status=1
done
exit "$status"
