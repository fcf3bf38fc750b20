"""Worker (torchrun): build launch/train.py's engine from its flags, load a canonical checkpoint
(--resume) and save it straight back natively (no step), for the canonical -> engine -> native ->
convert -> canonical round trip of tests/test_checkpoint.py. Flags are train.py's plus --save-dir."""

from __future__ import annotations

from apollo_dist.checkpoint import resume_canonical
from apollo_dist.runtime import shutdown
from launch import engines, train
from launch.model import build_model, llama_config


def main() -> None:
    args = train.parse_args()
    run, hp, ds_cfg, tokenizer, _ = train.validate(args)
    d = engines.init_distributed(run.engine)
    model = build_model(llama_config(args.model, tokenizer.vocab_size, args.seq_len), args.seed)
    ds_full = train.deepspeed_config(ds_cfg, hp, run) if run.engine == "deepspeed" else None
    engine = engines.make_engine(run.engine, model, hp, run, d, ds_full)
    step = int(
        resume_canonical(
            args.resume, engine.optimizer, getattr(engine.model, "module", engine.model), engine.scheduler
        )["step"]
    )
    engine.save_checkpoint(step)
    shutdown()


if __name__ == "__main__":
    main()
