"""Run a worker script with the launches of apollo_dist.kernels' Triton kernels counted:

    python launch_counted.py OUT_DIR SCRIPT ARGS...        (also under torchrun: one file per rank)

writes OUT_DIR/rank<R>.json: {kernel: launches} of this rank, when the script calls
apollo_dist.runtime.shutdown (which leaves with os._exit under gloo) or returns.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

from launch_count import Launches

import apollo_dist.runtime


def main() -> None:
    out_dir, script, *args = sys.argv[1:]
    path = Path(out_dir) / f"rank{os.environ.get('RANK', '0')}.json"
    launches = Launches().__enter__()
    written = []

    def write() -> None:
        if not written:
            path.write_text(json.dumps(launches.counts))
            written.append(True)

    shutdown = apollo_dist.runtime.shutdown

    def counted_shutdown() -> None:
        write()
        shutdown()

    apollo_dist.runtime.shutdown = counted_shutdown  # the script imports it by name when run
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
    write()


if __name__ == "__main__":
    main()
