"""``APOLLOTrainer.train(resume_from_checkpoint=...)`` on another number of processes under ``deepspeed=``
ZeRO-2 / ZeRO-3 (CPU, gloo; the real Trainer, accelerate and DeepSpeed): APOLLOTrainer routes the engine's
``load_checkpoint`` to ``apollo_dist.deepspeed.load_checkpoint``, which DeepSpeed's own loader would refuse
("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not currently supported").

A W=2 run of 10 steps (global batch 12 = 6 x 2, APOLLO rank 4, update_proj_gap 3: projection refreshes on both
sides of the checkpoint) saves a Trainer checkpoint at step 5; W=3 (12 = 4 x 3) resumes it: steps 6-10 give the
uninterrupted run's losses within 1e-5 relative, and the Trainer's global step and APOLLO's step count continue
from 5 to 10. ZeRO-1 (the same route) is marked slow.
"""

from __future__ import annotations

import pytest
from spawn import report, torchrun

WORKER = "tests/workers/hf_trainer.py"
COMMON = ("--mode", "apollo_dist", "--steps", "10", "--global-batch", "12", "--optim-args", "rank=4,update_proj_gap=3")
REL = 1e-5


def _run(tmp_path, name: str, world: int, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    torchrun(WORKER, world, *COMMON, "--dir", str(tmp_path / name), "--out", str(out), *args, timeout=600)
    return report(out)


@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2, 3])
def test_trainer_deepspeed_resumes_at_another_world_size(tmp_path, stage):
    full = _run(tmp_path, "w2", 2, "--stage", str(stage), "--save-steps", "5")
    assert full["world"] == 2 and full["global_step"] == 10 and full["steps_taken"] == 10
    resumed = _run(tmp_path, "w3", 3, "--stage", str(stage), "--resume", str(tmp_path / "w2" / "checkpoint-5"))
    assert resumed["world"] == 3 and resumed["optimizer"] == "APOLLO"
    assert resumed["load_checkpoint"] == "apollo_dist.deepspeed.load_checkpoint"
    assert resumed["global_step"] == 10 and resumed["steps_taken"] == 10  # 5 loaded + 5 taken here
    for step in range(6, 11):
        a, b = full["losses"][str(step)], resumed["losses"][str(step)]
        assert abs(a - b) <= REL * abs(a), (step, a, b)


def test_trainer_mixtral_experts_resume_at_another_world_size(tmp_path):
    """Issue 29 through the Trainer: a tiny transformers Mixtral (experts fused [E, 2I, H] / [E, H, I]), ZeRO-2,
    optim_target_modules ["attn", "mlp"]: APOLLOTrainer gives every expert slice low-rank state (4 fused weights x
    4 experts = 16 slots); saved at step 5 at W=2, resumed at W=3, steps 6-10 continue the uninterrupted losses."""
    full = _run(tmp_path, "w2", 2, "--stage", "2", "--save-steps", "5", "--mixtral")
    assert full["global_step"] == 10 and full["steps_taken"] == 10
    assert full["expert_slots"] == 16, full  # low-rank slots of expert slices
    resumed = _run(tmp_path, "w3", 3, "--stage", "2", "--resume", str(tmp_path / "w2" / "checkpoint-5"), "--mixtral")
    assert resumed["world"] == 3 and resumed["load_checkpoint"] == "apollo_dist.deepspeed.load_checkpoint"
    assert resumed["global_step"] == 10 and resumed["steps_taken"] == 10
    for step in range(6, 11):
        a, b = full["losses"][str(step)], resumed["losses"][str(step)]
        assert abs(a - b) <= REL * abs(a), (step, a, b)
