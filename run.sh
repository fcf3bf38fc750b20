#!/usr/bin/env bash
# The two newcomer commands:  ./run.sh train [train.py flags]   and   ./run.sh test [pytest args]
# Each sets up ./.venv (pinned, CPU torch from local disk) on first use.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
cmd=${1:-train}; shift || true
export PATH="$PWD/.venv/bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
case "$cmd" in
  test) exec python -m pytest -q "$@" ;;
  train) exec bash launch/train_default.sh "$@" ;;
  *) echo "usage: ./run.sh train|test [args]" >&2; exit 2 ;;
esac
