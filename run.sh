#!/usr/bin/env bash
# The two newcomer commands:  ./run.sh train [train.py flags]   and   ./run.sh test [pytest args]
# Each sets up ./.venv (pinned, CPU torch from local disk) on first use.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
cmd=${1:-train}; shift || true
export PATH="$PWD/.venv/bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
case "$cmd" in
  # Two test files at a time (-n 2: CI has 2 cores; tests mostly wait on launched ranks), each file's tests
  # on one worker so its module fixtures run once; later -n / --dist arguments win.
  # Lint and format check first (ruff, a second or two; pyproject.toml's [tool.ruff]).
  test) ruff check --quiet . && ruff format --check --quiet . && exec python -m pytest -q -n 2 --dist loadfile "$@" ;;
  train) exec bash launch/train_default.sh "$@" ;;
  *) echo "usage: ./run.sh train|test [args]" >&2; exit 2 ;;
esac
