"""Worker (torchrun): build launch/train.py's engine from its flags, load a canonical checkpoint
(--resume) and save it straight back natively (no step), for the canonical -> engine -> native ->
convert -> canonical round trip of tests/test_checkpoint.py. Flags are train.py's plus --save-dir."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(ROOT, "launch"), ROOT]

import engines  # noqa: E402
import train  # noqa: E402
from model import build_model, llama_config  # noqa: E402

from apollo_dist.checkpoint import resume_canonical  # noqa: E402


def main() -> None:
    args = train.parse_args()
    run, hp, ds_cfg, tokenizer, _ = train.validate(args)
    d = engines.init_distributed(run["engine"])
    model = build_model(llama_config(args.model, tokenizer.vocab_size, args.seq_len), args.seed)
    ds_full = train.deepspeed_config(ds_cfg, hp, run) if run["engine"] == "deepspeed" else None
    engine = engines.make_engine(run["engine"], model, hp, run, d, ds_full)
    step = int(resume_canonical(args.resume, engine.optimizer, engine.model, engine.scheduler)["step"])
    engine.save_checkpoint(step)
    engines.shutdown()


if __name__ == "__main__":
    main()
