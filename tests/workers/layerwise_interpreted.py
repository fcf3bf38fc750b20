"""Layer-wise APOLLO's per-param non-finite check on the fused Triton kernels, run on CPU tensors by Triton's
interpreter (TRITON_INTERPRET=1, set by the caller): tests/poisoned.py's runs (NaN gradients in two params at two
steps, a NaN loss), layer-wise against the ordinary step with those gradients left out. Prints one JSON line:
the difference, step counts, whether the NaN-loss step changed nothing, the skip count, and the kernels each
run launched."""

from __future__ import annotations

import json
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
import oracle  # noqa: E402
import poisoned  # noqa: E402
from launch_count import Launches  # noqa: E402

from apollo_dist import kernels  # noqa: E402

assert kernels.fused(kernels.torch.zeros(1)), "the interpreter should take CPU tensors"
out = {}
with Launches() as launches:
    ours = poisoned.train("apollo-mini", layerwise=True, steps=7)
    out["launches"] = launches.snapshot()
ref = poisoned.train("apollo-mini", layerwise=False, steps=7)
out.update(
    diff=oracle.max_rel_diff(ours["model"], ref["model"]),
    steps=ours["steps"],
    ref_steps=ref["steps"],
    untouched=ours["untouched"],
    skipped=ours["skipped"],
    warnings=ours["warnings"],
    buckets=sum(1 for _ in ours["model"].parameters()),
)
print(json.dumps(out))
