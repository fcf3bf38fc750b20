"""PyTorch Lightning with APOLLO under ``DeepSpeedStrategy``: resume on another number of GPUs.

One added callback::

    from apollo_dist.lightning import AnyWorldSizeResume

    trainer = pl.Trainer(strategy=DeepSpeedStrategy(stage=2), devices=3, callbacks=[AnyWorldSizeResume()])
    trainer.fit(module, ckpt_path="ckpts/epoch=0-step=500.ckpt")   # written at devices=2

Lightning's ``DeepSpeedStrategy.load_checkpoint`` calls the engine's ``load_checkpoint``, which DeepSpeed refuses
at another data-parallel world size ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world
size is not currently supported"). The callback routes that engine's ``load_checkpoint`` to
`apollo_dist.deepspeed.load_checkpoint` in ``on_fit_start``: Lightning calls it after the strategy has built the
engine (``strategy.setup``) and before it restores ``ckpt_path`` (``restore_checkpoint_after_setup`` is True for
DeepSpeed). The same W and ZeRO stage still go to DeepSpeed's own loader; another W or stage is loaded by APOLLO's
loader, which returns the client state Lightning saved with the checkpoint (its loops, epoch, global step, lr
schedulers, callbacks, hyperparameters), so the fit continues as at the same W. Keep the global batch (per-device
batch x devices x accumulate_grad_batches) the same.

A callback, not a strategy subclass: it works with ``strategy="deepspeed_stage_2"`` strings and with the user's
own DeepSpeedStrategy subclasses, and does nothing under any other strategy (FSDP2's ``ModelParallelStrategy``
reshards through ``torch.distributed.checkpoint`` already). ``fit`` only: ``validate`` / ``test`` / ``predict``
with a ``ckpt_path`` restore before any callback hook runs.

Only this module imports Lightning (``lightning.pytorch``, else ``pytorch_lightning``).
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback  # type: ignore[no-redef]

__all__ = ["AnyWorldSizeResume", "route_strategy"]


def route_strategy(strategy: Any) -> bool:
    """Route the ``load_checkpoint`` of a Lightning DeepSpeedStrategy's engine to
    `apollo_dist.deepspeed.load_checkpoint`. True when ``strategy`` holds a DeepSpeed engine (after
    ``strategy.setup``), False otherwise (another strategy, or no engine yet)."""
    engine = getattr(strategy, "model", None)
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:
        return False
    if not isinstance(engine, DeepSpeedEngine):
        return False
    from .deepspeed import _route_load_checkpoint

    _route_load_checkpoint(engine)
    return True


class AnyWorldSizeResume(Callback):
    """``trainer.fit(module, ckpt_path=...)`` under ``DeepSpeedStrategy`` resumes a checkpoint written at another
    number of devices or ZeRO stage (see the module docstring). No state of its own."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        route_strategy(trainer.strategy)
