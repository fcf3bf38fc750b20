"""Where the process launchers are: next to this Python (a venv), else on PATH."""

from __future__ import annotations

import os
import shutil
import sys


def launcher(name: str) -> str:
    """Path of ``name`` (torchrun, deepspeed, mpirun): beside ``sys.executable``, else the first on PATH.

    Raises FileNotFoundError naming both places when neither has it."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(here):
        return here
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"launcher {name!r} is neither next to {sys.executable} nor on PATH")
    return found
