"""launch/train.py with the reference apollo-torch (APOLLOAdamW) in place of apollo_dist.APOLLO.

    python tools/train_reference.py --engine single --model 60m --rank 128 ... (train.py's flags)

For quality comparisons only (BENCHMARKS.md): same model, data, schedule and param groups, one
process. apollo-torch is CC-BY-NC and a test oracle: the library never imports it; install it with
`pip install --no-deps apollo-torch==1.0.3`.
"""

from __future__ import annotations

import sys

from apollo_dist import APOLLO
from launch import engines, train
from tools.reference import oracle_class

_build = engines.build_optimizer


def build_reference(model, hp, layerwise: bool = False):
    """The same groups and hyperparameters as train.py's APOLLO, stepped by apollo-torch."""
    if layerwise:
        raise SystemExit("train_reference.py: apollo-torch has no layer-wise updates here (leave out --layerwise)")
    opt = _build(model, hp)
    if not isinstance(opt, APOLLO):
        return opt
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in opt.param_groups]
    return oracle_class()(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay)


if __name__ == "__main__":
    if "--deepspeed" in sys.argv or "fsdp2" in sys.argv:
        raise SystemExit(
            "train_reference.py: apollo-torch runs only with --engine single (it crashes under ZeRO-2/3 and FSDP2)"
        )
    engines.build_optimizer = build_reference
    sys.exit(train.main())
