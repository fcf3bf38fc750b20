"""bf16 against an oracle (issue 26, item 5): launch/train.py's bf16 paths at W=3 on CPU (gloo), each
measured against a noise floor that the same bf16 setting gives a trusted optimizer.

The setting (tests/workers/bf16_oracle.py): tiny LLaMA, 30 steps, global batch 6, seq 64, lr 1e-3
(stable: at 1e-2 a tiny model is chaotic and bf16 runs part by percents), warm-up then cosine, clipping
1.0, APOLLO rank 16 / APOLLO-Mini, projection refreshed every 10 steps. The distance between two runs is
the mean over the 30 steps of |loss_a - loss_b| / loss_b (the mean, not the max: a tiny model has sharp
steps, e.g. just after a projection refresh, where one step's loss moves 5-10x more than its
neighbours'; the max is recorded too, in BENCHMARKS.md).

- The one-process reference computes as the engines do: fp32 masters held by the optimizer, a bf16 copy
  of the parameters (rotary frequencies fp32) for forward and backward on the whole global batch, its
  bf16 gradients cast to fp32 for clipping and the step. An engine then differs from it only by what
  data parallelism changes (each rank's bf16 backward over its rows, the reduction). Autocast would be
  a looser reference: its fp32 residual stream and norms add a systematic difference that is no engine's
  (measured: AdamW under FSDP2 6e-4 max from autocast, 1e-4 from this reference).
- Floor of engine E: torch AdamW under E vs torch AdamW in the reference. APOLLO's distance: apollo_dist
  under E vs apollo-torch 1.0.3 in the reference. Bound: 2 x floor x a (+ 1e-5), where a >= 1 is how much
  more the reference optimizer itself moves than AdamW under the same bf16 perturbation, measured in one
  process (the reference with its batch cut into 2 or 3 row groups whose bf16 gradients are averaged in
  fp32, vs uncut): 1 for APOLLO (it moves less than AdamW), about 2 for APOLLO-Mini (rank 1, scale 128).
  a is a property of apollo-torch and AdamW, never of the library under test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from spawn import launcher, report, run_checked, torchrun

from apollo_dist.runtime import free_port

WORKER = "tests/workers/bf16_oracle.py"
OPTIMIZERS = ("adamw", "apollo", "apollo-mini")
EPS = 1e-5  # fp32 arithmetic of two implementations (2e-7 on these losses in fp32), after bf16 rounding


def distance(a: list[float], b: list[float]) -> float:
    """Mean over steps of the relative loss difference of ``a`` from ``b``."""
    assert len(a) == len(b) and a
    return sum(abs(x - y) / abs(y) for x, y in zip(a, b)) / len(a)


def max_distance(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def launch_worker(out: Path, *args: str) -> dict:
    torchrun(WORKER, 3, "--out", str(out), *args, timeout=900)
    return report(out)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """The one-process references of AdamW, APOLLO and APOLLO-Mini: uncut (split1) and cut into 2 and 3
    row groups (run side by side on 3 ranks)."""
    out = tmp_path_factory.mktemp("bf16") / "refs.json"
    return launch_worker(out, "--engines", "", "--splits", "1,2,3")


def amplification(refs: dict, optimizer: str) -> float:
    """How much more the reference ``optimizer`` moves than AdamW under the same bf16 perturbation
    (at least 1)."""

    def sensitivity(o: str) -> float:
        base = refs[f"reference/{o}/split1"]
        return sum(distance(refs[f"reference/{o}/split{s}"], base) for s in (2, 3)) / 2

    return max(1.0, sensitivity(optimizer) / sensitivity("adamw"))


def check_engine(refs: dict, runs: dict, engine: str, presets=("apollo", "apollo-mini")) -> dict:
    floor = distance(runs[f"{engine}/adamw"], refs["reference/adamw/split1"])
    assert floor < 1e-3, f"{engine}: AdamW's bf16 floor {floor:.2e} (is the bf16 path itself right?)"
    assert runs[f"{engine}/adamw"][-1] < runs[f"{engine}/adamw"][0] - 1.5  # it learns
    got = {"floor": floor}
    for preset in presets:
        d = distance(runs[f"{engine}/{preset}"], refs[f"reference/{preset}/split1"])
        a = amplification(refs, preset)
        got[preset] = (d, a)
        print(
            f"{engine} {preset}: floor {floor:.2e}, distance {d:.2e} (max {max_distance(runs[f'{engine}/{preset}'], refs[f'reference/{preset}/split1']):.2e}), a {a:.2f}; adamw max {max_distance(runs[f'{engine}/adamw'], refs['reference/adamw/split1']):.2e}"
        )
        assert d <= 2 * floor * a + EPS, (
            f"{engine} {preset}: {d:.2e} from apollo-torch, bound 2 x {floor:.2e} (AdamW's floor) x {a:.2f} + {EPS}"
        )
    return got


def test_fsdp2_bf16_matches_oracle_within_adamw_floor(references, tmp_path):
    """FSDP2 W=3, MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) (train.py's GPU default):
    APOLLO and APOLLO-Mini stay within 2x the bf16 floor (AdamW under FSDP2 W=3 vs AdamW in the
    reference; scaled by the oracle's own sensitivity) of apollo-torch."""
    runs = launch_worker(tmp_path / "fsdp2.json", "--engines", "fsdp2", "--splits", "")
    check_engine(references, runs, "fsdp2")


def test_zero2_bf16_matches_oracle_within_adamw_floor(references, tmp_path):
    """DeepSpeed ZeRO-2 W=3, bf16 {enabled: true} (ds_configs/apollo.json): APOLLO and APOLLO-Mini
    within 2x the floor AdamW under ZeRO-2 W=3 gives."""
    runs = launch_worker(tmp_path / "zero2.json", "--engines", "zero2", "--splits", "")
    check_engine(references, runs, "zero2")


def test_zero3_bf16_matches_oracle_within_adamw_floor(references, tmp_path):
    """DeepSpeed ZeRO-3 W=3, bf16 (ds_configs/apollo_zero3.json, model built under zero.Init): APOLLO
    and APOLLO-Mini within 2x the floor AdamW under ZeRO-3 W=3 gives."""
    runs = launch_worker(tmp_path / "zero3.json", "--engines", "zero3", "--splits", "")
    check_engine(references, runs, "zero3")


def test_param_dtype_bf16_matches_oracle_with_fp32_state(tmp_path):
    """--param-dtype bf16 (--engine single: bf16 parameters, no fp32 master; the 7B one-GPU setting).

    apollo_dist keeps fp32 moments, computes the update in fp32 and rounds it into the bf16 weight once
    per step. The reference with that arithmetic: apollo-torch stepping fp32 copies of the bf16 weights
    (fp32 moments), rounded into them after each step and reset to the rounded values. The two differ only
    in the order of fp32 operations, which bf16 rounding amplifies; the floor of that is the same
    reference with its gradients scaled by 1 + 2^-22 (APOLLO is scale-invariant but for rounding). Bound:
    2x that floor + 1e-5.

    apollo-torch run directly on the bf16 weights keeps bf16 moments and rounds each intermediate to
    bf16 (2^-9 relative); with beta2 = 0.999, v's decay of 1e-3 per step is below half a bf16 ulp, so its
    second moment lags: a systematic difference, not noise, and no tolerance for an oracle. It is
    measured and must be farther from the fp32-state reference than apollo_dist is (ours keeps fp32
    state: if it kept bf16 moments it would sit where apollo-torch-on-bf16 sits)."""
    out = tmp_path / "pd.json"
    run_checked([sys.executable, WORKER, "--param-dtype-bf16", "--optimizers", "apollo,apollo-mini", "--out", str(out)])
    r = report(out)
    for o in ("apollo", "apollo-mini"):
        ref = r[f"params_bf16/{o}/oracle-shadow"]
        floor = distance(r[f"params_bf16/{o}/oracle-shadow-perturbed"], ref)
        ours = distance(r[f"params_bf16/{o}/ours"], ref)
        bf16_moments = distance(r[f"params_bf16/{o}/oracle-bf16"], ref)
        print(f"param-dtype {o}: ours {ours:.2e} floor {floor:.2e} bf16-moments {bf16_moments:.2e}")
        assert ours <= 2 * floor + EPS, f"{o}: {ours:.2e} from the fp32-state oracle, floor {floor:.2e}"
        assert ours < bf16_moments, f"{o}: {ours:.2e} vs apollo-torch with bf16 moments {bf16_moments:.2e}"


STEPS, SAVE_AT = 30, 15
TRAIN_FLAGS = [
    "--model",
    "tiny",
    "--steps",
    str(STEPS),
    "--global-batch-size",
    "6",
    "--micro-batch-size",
    "1",
    "--seq-len",
    "64",
    "--rank",
    "16",
    "--update-proj-gap",
    "10",
    "--lr",
    "1e-3",
    "--dtype",
    "bf16",
    "--eval-every",
    "30",
    "--eval-samples",
    "6",
    "--no-progress",
]


def losses(metrics: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow  # 77 s; the default run covers a bf16 resume at another W bitwise (test_ds_resume, test_resume_any)
def test_bf16_checkpoint_resumes_at_another_w(tmp_path):
    """ZeRO-2 W=2 bf16 trains 30 steps, saving at step 15; tools/convert_checkpoint.py makes it canonical;
    FSDP2 W=3 bf16 resumes it and trains steps 16-30. Their losses stay within 2x the floor of changing
    W and engine in bf16 (an uninterrupted FSDP2 W=3 run vs the ZeRO-2 W=2 one over the same steps) +
    1e-5: the fp32 masters, moments, limiter norms, step counts and schedule came over. Step 16's loss
    (the converted weights' forward, before any step at W=3) within 1e-5 of the W=2 run's."""
    z2, resumed, f3 = tmp_path / "z2", tmp_path / "resumed", tmp_path / "f3"
    port = str(free_port())
    run_checked(
        [launcher("deepspeed"), "--num_gpus", "2", "--master_port", port, "launch/train.py"]
        + ["--deepspeed", "ds_configs/apollo.json", *TRAIN_FLAGS, "--metrics-file", str(z2 / "metrics.jsonl")]
        + ["--save-dir", str(z2 / "ckpt"), "--save-every", str(SAVE_AT)],
        timeout=600,
    )
    run_checked(
        [sys.executable, "tools/convert_checkpoint.py", str(z2 / "ckpt" / f"step_{SAVE_AT:07d}"), str(tmp_path / "c")]
    )
    fsdp2 = [launcher("torchrun"), "--standalone", "--nproc_per_node", "3", "launch/train.py", "--engine", "fsdp2"]
    run_checked(fsdp2 + ["--resume", str(tmp_path / "c"), "--metrics-file", str(resumed / "metrics.jsonl")])
    run_checked(fsdp2 + [*TRAIN_FLAGS, "--metrics-file", str(f3 / "metrics.jsonl")])
    ref, got, other = losses(z2 / "metrics.jsonl"), losses(resumed / "metrics.jsonl"), losses(f3 / "metrics.jsonl")
    steps = list(range(SAVE_AT + 1, STEPS + 1))
    assert sorted(got) == steps
    floor = distance([other[s] for s in steps], [ref[s] for s in steps])
    d = distance([got[s] for s in steps], [ref[s] for s in steps])
    first = abs(got[SAVE_AT + 1] - ref[SAVE_AT + 1]) / ref[SAVE_AT + 1]
    print(f"resume: {d:.2e} floor {floor:.2e}; first step {first:.2e}")
    assert first < 1e-5  # step 16's forward runs on the converted weights: the same bf16 weights (1e-7 measured)
    assert floor < 1e-3
    assert d <= 2 * floor + EPS, f"resumed at W=3: {d:.2e} from the W=2 run, floor {floor:.2e}"
