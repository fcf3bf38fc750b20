#!/usr/bin/env bash
# Creates ./.venv with the pinned dependencies (idempotent). Used by run.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ] || [ requirements.txt -nt .venv/.done ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  # Test oracle only (CC-BY-NC); --no-deps because it pulls bitsandbytes, which tests stub.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps apollo-torch==1.0.3
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
  touch .venv/.done
fi
