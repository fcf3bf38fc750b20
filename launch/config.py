"""The training job's settings as types (as torchtitan's JobConfig): launch/train.py resolves them from its
flags, the DeepSpeed JSON's defaults and a resumed checkpoint; the engines read them; each checkpoint's
trainer.json records the saved fields under their names (the flags' dests), and --resume reads them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional


def _saved(**kw: Any) -> Any:
    """A field recorded in trainer.json (and taken back on --resume unless its flag is given)."""
    return field(metadata={"saved": True}, **kw)


@dataclass(kw_only=True)
class RunConfig:
    """The run: engine and world, batch geometry, schedule, precision, data, paths and the layout options."""

    engine: str  # single | fsdp2 | deepspeed (--engine auto resolved)
    world: int  # W: the ranks the launcher started
    # -- saved in each checkpoint's trainer.json, in this order (RUN_KEYS_SAVED) ------------------
    model: str = _saved()  # tiny|60m|130m|350m|1b|7b or a LlamaConfig JSON
    seed: int = _saved()
    global_batch_size: int = _saved()  # sequences per step
    seq_len: int = _saved()
    dtype: str = _saved()  # compute: fp32 | bf16
    data: str = _saved()  # --data: a text file, a directory, a tarball or a .bin
    steps: int = _saved()
    warmup_steps: int = _saved()
    grad_clip: float = _saved()  # max global grad norm, 0: off
    activation_checkpointing: bool = _saved(default=False)
    layerwise: bool = _saved(default=False)
    weight_quant: str = _saved(default="none")  # none | int8
    param_dtype: str = _saved(default="fp32")  # the parameters' own dtype: fp32 | bf16
    # -- this launch's -------------------------------------------------------------------------------
    micro_batch_size: int  # per rank and forward
    grad_accum: int  # micro-batches per step
    save_dir: Optional[str] = None
    metrics_file: Optional[str] = None
    init_from: Optional[str] = None  # a Hugging Face LLaMA checkpoint directory
    mesh: Optional[tuple[int, int]] = None  # FSDP2 as HSDP: (replicas, shards)
    tp: int = 1  # tensor-parallel size (FSDP2)

    @classmethod
    def saved_keys(cls) -> tuple[str, ...]:
        """The fields trainer.json records, in its order."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("saved"))

    def saved(self) -> dict[str, Any]:
        """The fields trainer.json records, by name."""
        return {k: getattr(self, k) for k in self.saved_keys()}


RUN_KEYS_SAVED = RunConfig.saved_keys()


@dataclass(kw_only=True)
class OptimizerConfig:
    """The optimizer's hyperparameters: trainer.json's "hparams" (field = key), and under DeepSpeed the
    "optimizer" block's params of the config train.py hands it. Optional fields left None are absent there."""

    optimizer: str  # apollo | apollo-mini | adamw
    lr: float
    betas: list[float]
    eps: float
    weight_decay: float
    target_modules: list[str]
    # APOLLO's low-rank group keys (None under adamw)
    rank: Optional[int] = None  # the projection rank r
    scale_type: Optional[str] = None  # channel | tensor
    scale: Optional[float] = None
    update_proj_gap: Optional[int] = None
    proj: Optional[str] = None
    proj_type: Optional[str] = None
    # APOLLO's options beyond Adam's, passed on when the JSON's optimizer block gives them
    correct_bias: Optional[bool] = None
    scale_front: Optional[bool] = None
    disable_nl: Optional[bool] = None
    projection_tf32: Optional[bool] = None
    # Keys of a saved "hparams" this version has no field for: kept and written back as they came
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """trainer.json's "hparams": every field set, by name (``extra``'s keys last)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, hparams: dict[str, Any]) -> "OptimizerConfig":
        """From trainer.json's "hparams" (or the dict train.py resolves from flags and the JSON)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in hparams.items() if k in known},
            extra={k: v for k, v in hparams.items() if k not in known},
        )
