#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment, then run one thing in it.
#   bash scripts/dev.sh run [alignheads run options]   # the embedded default, end to end
#   bash scripts/dev.sh test [pytest options]          # the test suite
#   bash scripts/dev.sh lint                           # only the layer contract (lint-imports)
#   bash scripts/dev.sh setup                          # only create/refresh .venv
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ALIGNHEADS_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  # Reinstall only when the pins or the package metadata changed since the last install.
  local stamp="$VENV/.alignheads-install" want
  want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # torch first and pinned: this version's CPU build is what installs here; an unpinned
  # torch would pull several GB of CUDA packages.
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
}

lint_imports() {
  # The sub-packages live in top-level folders (flows/, tasks/, models/, storage/, configs/,
  # mapped by pyproject's package-dir); alignheads/ holds a symlink to each, so import-linter
  # finds the package laid out as it is installed, run from the repository root.
  "$VENV/bin/lint-imports"
}

export PREFECT_SERVER_ANALYTICS_ENABLED=${PREFECT_SERVER_ANALYTICS_ENABLED:-false}
# The tiny world's models are too small for several OpenMP threads to pay: on two shared cores
# they spin-wait (measured: pretraining 0.6 steps/s with the default, 2.7 with one thread).
# Set OMP_NUM_THREADS yourself for a real model on a CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-180}

verb=${1:-}
[ $# -gt 0 ] && shift
case "$verb" in
  setup) setup ;;
  run) setup; exec "$VENV/bin/alignheads" run "$@" ;;
  lint) setup; lint_imports ;;
  test) setup; lint_imports; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash scripts/dev.sh {run|test|lint|setup} [args...]" >&2; exit 2 ;;
esac
