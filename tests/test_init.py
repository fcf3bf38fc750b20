"""Model construction of launch/train.py (issue 14): built on the meta device (FSDP2, single, ZeRO-1/2) or
under deepspeed.zero.Init (ZeRO-3), each rank initializing only what it holds, with initial weights that
are a function of the seed alone: bit-identical whatever the engine and world size; and a rank's host
memory grows by its share of the weights, not by the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from spawn import run_checked

pytestmark = pytest.mark.usefixtures("corpus")
COMMON = (
    "--model tiny --steps 1 --lr 0 --weight-decay 0 --global-batch-size 6 --seq-len 32 "
    "--eval-every 100 --eval-samples 2 --dtype fp32 --no-progress"
).split()
ZERO3 = {"DS_CONFIG": "ds_configs/apollo_zero3.json"}


def _launch(engine: str, world: int, *args: str) -> None:
    if engine == "single":
        run_checked([sys.executable, "launch/train.py", "--engine", "single", *args])
    elif engine == "fsdp2":
        run_checked(["bash", "launch/fsdp2.sh", *args], NPROC=str(world))
    else:
        run_checked(["bash", "launch/zero2.sh", *args], NPROC=str(world), **ZERO3)


def _initial_weights(tmp_path: Path, engine: str, world: int) -> dict[str, torch.Tensor]:
    """One step at lr 0 (the weights stay the initial ones), saved, read back in full."""
    d = tmp_path / f"{engine}{world}"
    _launch(engine, world, *COMMON, "--save-dir", str(d / "ckpt"), "--metrics-file", str(d / "m.jsonl"))
    step = d / "ckpt" / "step_0000001"
    if engine == "single":
        return torch.load(step / "state.pt", weights_only=False)["model"]
    from safetensors.torch import load_file

    run_checked(
        [sys.executable, "tools/convert_checkpoint.py", str(step), str(d / "canon"), "--export-hf", str(d / "hf")]
    )
    out = {}
    for f in sorted((d / "hf").glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def single_weights(tmp_path_factory, corpus) -> dict[str, torch.Tensor]:
    return _initial_weights(tmp_path_factory.mktemp("single"), "single", 1)


# W=3 (uneven splits) runs in CI; W=2 is slow-marked.
@pytest.mark.parametrize(
    "engine,world",
    [("fsdp2", 3), ("zero3", 3)] + [pytest.param(e, 2, marks=pytest.mark.slow) for e in ("fsdp2", "zero3")],
)
def test_initial_weights_are_the_same_for_every_engine_and_world_size(tmp_path, single_weights, engine, world):
    ref = single_weights
    assert ref and ref["model.embed_tokens.weight"].std() > 0.01
    got = _initial_weights(tmp_path, engine, world)
    assert sorted(got) == sorted(ref), (engine, world)
    different = [n for n in ref if not torch.equal(got[n].float(), ref[n].float())]
    assert not different, f"{engine} W={world}: initial weights differ in {different[:4]}"


@pytest.mark.slow  # ~2 min in CI (a 314M-param model at W=2 under two engines): suite time
def test_host_memory_grows_by_the_rank_share_not_the_model(tmp_path):
    """A 314 M-parameter config (1.26 GB fp32; 24 layers, vocabulary 8000) at W = 2 under FSDP2 and ZeRO-3
    (zero.Init): the peak RSS a rank gains while its part of the model is built is its share (half) plus
    a fixed 0.25 GiB (the parameter drawn whole), far from the whole model. glibc's mmap threshold is
    pinned at 64 KiB: by default it rises to the largest freed block, and the whole-size allocations that
    zero.Init frees at once then stay in the heap (ZeRO-3 measured 0.15-0.45 GiB over the share that way;
    with the pin 0.06). On a GPU these allocations are on the device."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 8000,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_hidden_layers": 24,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
    }
    path = tmp_path / "big.json"
    path.write_text(json.dumps(cfg))
    total = 2 * 8000 * 1024 + 24 * (4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024) + 1024
    whole, share = total * 4 / 2**30, total * 4 / 2 / 2**30
    args = [
        "--model",
        str(path),
        "--steps",
        "1",
        "--global-batch-size",
        "2",
        "--micro-batch-size",
        "1",
        "--seq-len",
        "16",
        "--eval-every",
        "100",
        "--eval-samples",
        "2",
        "--no-progress",
    ]
    for engine, script, env in (("fsdp2", "launch/fsdp2.sh", {}), ("zero3", "launch/zero2.sh", ZERO3)):
        m = tmp_path / f"{engine}.jsonl"
        run_checked(["bash", script, *args, "--metrics-file", str(m)], NPROC="2", MALLOC_MMAP_THRESHOLD_="65536", **env)
        first = json.loads(m.read_text().splitlines()[0])
        grown = [b - a for a, b in zip(first["host_rss_before_model_gib"], first["host_rss_model_built_gib"])]
        print(
            f"{engine}: ranks grew by {[round(g, 3) for g in grown]} GiB; share {share:.3f}, whole model {whole:.3f} GiB"
        )
        assert max(grown) <= share + 0.25, f"{engine}: a rank grew by {max(grown):.2f} GiB (share {share:.2f} GiB)"


def _val_loss_at(metrics: Path, step: int) -> float:
    return next(
        r["val_loss"]
        for r in map(json.loads, metrics.read_text().splitlines())
        if r["step"] == step and "val_loss" in r
    )


def test_init_from_a_saved_model_under_another_engine_and_world_size(tmp_path):
    """A run (FSDP2, W=2) saved at step 3 and exported (--export-hf; and re-saved sharded by transformers'
    save_pretrained): --init-from it under single, FSDP2 W=3 and ZeRO-3 W=2 starts where it was: the step-0
    validation loss is the saved run's step-3 one (same windows). A config that does not fit the weights
    names the file and the tensor."""
    from transformers import LlamaForCausalLM

    a = tmp_path / "a"
    _launch(
        "fsdp2",
        2,
        "--model",
        "tiny",
        "--steps",
        "3",
        "--global-batch-size",
        "6",
        "--seq-len",
        "32",
        "--eval-every",
        "3",
        "--eval-samples",
        "8",
        "--dtype",
        "fp32",
        "--no-progress",
        "--metrics-file",
        str(a / "m.jsonl"),
        "--save-dir",
        str(a / "ck"),
    )
    hf = tmp_path / "hf"
    run_checked(
        [
            sys.executable,
            "tools/convert_checkpoint.py",
            str(a / "ck" / "step_0000003"),
            str(tmp_path / "c"),
            "--export-hf",
            str(hf),
        ]
    )
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(hf).save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    want = _val_loss_at(a / "m.jsonl", 3)
    common = (
        "--steps 1 --global-batch-size 6 --seq-len 32 --eval-every 1 --eval-samples 8 --dtype fp32 --no-progress"
    ).split()
    for engine, world, src in (("single", 1, hf), ("fsdp2", 3, sharded), ("zero3", 2, sharded)):
        m = tmp_path / f"{engine}.jsonl"
        _launch(engine, world, "--init-from", str(src), *common, "--metrics-file", str(m))
        got = _val_loss_at(m, 0)
        assert abs(got - want) <= 1e-6 * want, f"{engine} W={world} from {src.name}: step-0 val loss {got} vs {want}"
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((hf / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 1}))
    (bad / "model.safetensors").symlink_to(hf / "model.safetensors")
    proc = run_checked(
        [sys.executable, "launch/train.py", "--engine", "single", "--init-from", str(bad), *common], check=False
    )
    line = proc.stderr.strip().splitlines()[-1]
    assert (
        proc.returncode == 2 and "model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape" in line
    ), proc.stderr[-800:]
