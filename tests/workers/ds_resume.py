"""Worker (launched by ``deepspeed --num_gpus W`` with DS_ACCELERATOR=cpu, gloo): a user's own DeepSpeed
script with APOLLO resumed at another world size (issue 27), several cases per launch.

A *cell* is ``z{stage}_{src}to{dst}_{preset}_{how}``: ZeRO stage, the world size that saves, the one that
loads, the APOLLO preset and how the engine is built (``plain``: ``deepspeed.initialize(model,
optimizer=APOLLO(...))`` resumed through ``apollo_dist.deepspeed.load_checkpoint(engine, dir)``;
``adapter``: ``apollo_dist.deepspeed.initialize`` resumed through its own ``engine.load_checkpoint(dir)``).
TinyNet, fp32, projection refreshed every 3 steps, global batch 12; the checkpoint is written after step 5
of 10, so a refresh falls on each side of the resume.

Parts (each optional):
  --save CELLS   cells with src == W: 5 steps, ``engine.save_checkpoint(DIR/cell)``, 5 more (the
                 uninterrupted run's 10 per-step losses in the report);
  --load CELLS   cells with dst == W (or src == dst: DeepSpeed's own load must be used, counted by a spy):
                 a fresh engine (other initial weights) loads DIR/cell and runs steps 6-10;
  --bf16 save|load  ZeRO-2 bf16: save after 5 steps; load at this W and compare the fp32 master weights of
                 every slot on every rank with the checkpoint's, bit for bit;
  --memory save|load  a model with a few large params (``--mem-model``: "wide" TinyNet or a launch/model.py
                 LLaMA size), ZeRO-2 fp32: save after one step; load as the first thing this process does,
                 with the peak RSS above the engine's own (VmHWM reset just before the load) in the report;
  --adamw        torch AdamW, ZeRO-2 and 3: save after 5 steps (DIR/adamw_z2, _z3), for the test to convert;
  --universal    that universal checkpoint loaded into APOLLO with ``checkpoint.load_universal``: what
                 initialize, both load_checkpoint entry points and the next step do, ZeRO-2 and ZeRO-3.
Rank 0 writes a JSON report to ``--out``; errors are reported as ``error/<part>``.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import oracle  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

oracle.stub_bitsandbytes()
import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402

# gloo does every collective here; DeepSpeed's CPU shared-memory op would JIT-compile for a minute.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from ds_equivalence import GLOBAL_BATCH, base_config, local_rows, plain_config, run_parts  # noqa: E402

import apollo_dist.checkpoint.live  # noqa: E402,F401  (imported before any RSS baseline)
import apollo_dist.deepspeed as ads  # noqa: E402
from apollo_dist import APOLLO  # noqa: E402
from apollo_dist.native_checkpoints import DeepSpeedSource  # noqa: E402

SAVE_AT, STEPS, GAP = 5, 10, 3

# DeepSpeed's own load, counted: apollo_dist.deepspeed.load_checkpoint must delegate at the same W and stage only.
DS_LOADS: list[str] = []
_ds_load = DeepSpeedEngine.load_checkpoint


def _spy_load(self, load_dir, tag=None, **kwargs):
    DS_LOADS.append(str(load_dir))
    return _ds_load(self, load_dir, tag, **kwargs)


DeepSpeedEngine.load_checkpoint = _spy_load


def parse_cell(cell: str) -> dict:
    stage, worlds, preset, how = cell.split("_")
    src, dst = worlds.split("to")
    return {"stage": int(stage[1:]), "src": int(src), "dst": int(dst), "preset": preset, "how": how}


def make_engine(stage: int, preset: str, how: str, seed: int, bf16: bool = False):
    """TinyNet (initial weights from ``seed``) and APOLLO (refresh every GAP steps) under a ZeRO engine."""
    W = dist.get_world_size()
    model = oracle.make_model(seed)
    opt = APOLLO(oracle.groups(model, preset, gap=GAP), **oracle.HPARAMS)
    cfg = base_config(stage, GLOBAL_BATCH // W)
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if how == "adapter":
        engine, *_ = ads.initialize(model=model, optimizer=opt, config=cfg)
    else:
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=plain_config(cfg))
    return engine, opt, model


def run(engine, t0: int, t1: int) -> list[float]:
    """Steps t0 .. t1-1 on this rank's rows of each global batch; the global mean loss of each step."""
    W, losses = dist.get_world_size(), []
    for t in range(t0, t1):
        loss = oracle.loss_fn(engine, *local_rows(t, 0, GLOBAL_BATCH // W))
        engine.backward(loss)
        engine.step()
        summed = loss.detach().float().clone()
        dist.all_reduce(summed)
        losses.append(float(summed) / W)
    return losses


def part_save(report: dict, cells: list[str], root: Path) -> None:
    W = dist.get_world_size()
    for cell in cells:
        c = parse_cell(cell)
        if c["src"] != W:
            continue
        engine, opt, _ = make_engine(c["stage"], c["preset"], c["how"], seed=0)
        losses = run(engine, 0, SAVE_AT)
        engine.save_checkpoint(str(root / cell), client_state={"cell": cell})
        losses += run(engine, SAVE_AT, STEPS)
        report[f"save/{cell}"] = {"losses": losses, "steps": opt.steps_taken}
        engine.destroy()


def part_load(report: dict, cells: list[str], root: Path) -> None:
    W = dist.get_world_size()
    for cell in cells:
        c = parse_cell(cell)
        if c["dst"] != W:
            continue
        engine, opt, _ = make_engine(c["stage"], c["preset"], c["how"], seed=1)
        before = len(DS_LOADS)
        if c["how"] == "adapter":
            path, client = engine.load_checkpoint(str(root / cell))
        else:
            path, client = ads.load_checkpoint(engine, str(root / cell))
        entry = {
            "deepspeed_loads": len(DS_LOADS) - before,
            "client_cell": client.get("cell"),
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
            # DeepSpeed returns its model-states file, apollo_dist.deepspeed.load_checkpoint the step directory
            "path": Path(path).name if Path(path).is_dir() else Path(path).parent.name,
            "path_is_dir": Path(path).is_dir(),
        }
        entry["losses"] = run(engine, SAVE_AT, STEPS)
        entry["steps"] = opt.steps_taken
        report[f"load/{cell}"] = entry
        engine.destroy()


def slot_names(opt: APOLLO, model: torch.nn.Module) -> list[tuple[str, object]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(s.param)], s) for s in opt.slots()]


def part_bf16(report: dict, mode: str, root: Path) -> None:
    """ZeRO-2 bf16: save at W after SAVE_AT steps / load here and compare masters with the checkpoint's."""
    ck = root / "bf16_z2"
    if mode == "save":
        engine, opt, _ = make_engine(2, "apollo", "plain", seed=0, bf16=True)
        run(engine, 0, SAVE_AT)
        engine.save_checkpoint(str(ck))
        report["bf16/save"] = {"world": dist.get_world_size(), "steps": opt.steps_taken}
        engine.destroy()
        return
    engine, opt, model = make_engine(2, "apollo", "plain", seed=1, bf16=True)
    before = len(DS_LOADS)
    ads.load_checkpoint(engine, str(ck))
    source = DeepSpeedSource(ck)
    entries = {e.name: e for e in source.meta.params}
    mismatched, compared, off_bf16 = [], 0, 0
    for name, s in slot_names(opt, model):
        saved = source.read(entries[name])["weight"].reshape(-1)[s.start : s.end]
        live = s.data.detach().float()
        compared += live.numel()
        if not torch.equal(saved, live):
            mismatched.append(name)
        # masters that a bf16 round trip would change: re-deriving them from the bf16 weights would show here
        off_bf16 += int((live != live.bfloat16().float()).sum())
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, {"mismatched": mismatched, "compared": compared, "off_bf16": off_bf16})
    losses = run(engine, SAVE_AT, SAVE_AT + 2)
    report["bf16/load"] = {
        "ranks": rows,
        "deepspeed_loads": len(DS_LOADS) - before,
        "source_world": source.world,
        "dtype": str(next(model.parameters()).dtype),
        "losses_after": losses,
    }
    engine.destroy()


# -- peak host memory during a load at a new W ----------------------------------------------------------
def _status() -> dict[str, int]:
    """/proc/self/status memory lines, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peak RssAnon / RssFile seen every ~1 ms (VmHWM is the exact peak of their sum)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            time.sleep(0.001)


def memory_model(kind: str) -> tuple[torch.nn.Module, object]:
    """(model, loss function of (model, step)): a TinyNet with a few large params, or a launch/model.py LLaMA."""
    if kind == "wide":
        torch.manual_seed(0)
        model = oracle.TinyNet(vocab=8192, d=256, h=1024, layers=2)  # embed/head 2.1M each, MLPs 0.26M

        def loss(engine, t):
            return oracle.loss_fn(engine, *oracle.batch(t, size=2, seq=16, vocab=8192))

        return model, loss
    from launch.model import build_model, llama_config, token_losses

    model = build_model(llama_config(kind, 32000, 32), seed=0)

    def loss(engine, t):
        g = torch.Generator().manual_seed(t)
        x = torch.randint(0, 32000, (1, 32), generator=g)
        return token_losses(engine, x, torch.roll(x, -1, 1)).mean()

    return model, loss


def part_memory(report: dict, mode: str, root: Path, kind: str) -> None:
    from apollo_dist import param_groups

    ck = root / f"memory_{kind}"
    model, loss_fn = memory_model(kind)
    opt = APOLLO(param_groups(model, preset="apollo", rank=16, update_proj_gap=GAP), **oracle.HPARAMS)
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=plain_config(cfg))
    if mode == "save":
        engine.backward(loss_fn(engine, 0))
        engine.step()
        engine.save_checkpoint(str(ck))
        report["memory/save"] = {"world": dist.get_world_size()}
        engine.destroy()
        return
    opt.ensure_bound()  # what the engine keeps, before the baseline
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status()
    sampler = Sampler()
    sampler.start()
    t0 = time.time()
    ads.load_checkpoint(engine, str(ck))
    seconds = time.time() - t0
    sampler.stop.set()
    sampler.join()
    after = _status()
    step_dir = DeepSpeedSource(ck).dir
    optim_bytes = sum(p.stat().st_size for p in step_dir.glob("*optim_states.pt"))
    all_bytes = sum(p.stat().st_size for p in step_dir.iterdir())
    largest = max(model.named_parameters(), key=lambda kv: kv[1].numel())
    row = {
        "peak_over_base": after["VmHWM"] - base["VmRSS"],
        "anon_peak_over_base": sampler.peak["RssAnon"] - base["RssAnon"],
        "file_peak_over_base": sampler.peak["RssFile"] - base["RssFile"],
        "after_over_base": after["VmRSS"] - base["VmRSS"],
        "base_rss": base["VmRSS"],
        "seconds": round(seconds, 2),
    }
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    losses = [float(loss_fn(engine, 1))]  # the engine still works
    report["memory/load"] = {
        "ranks": rows,
        "model": kind,
        "params": sum(p.numel() for p in model.parameters()),
        "optim_files_bytes": optim_bytes,
        "checkpoint_bytes": all_bytes,
        "largest_param": largest[0],
        "largest_param_numel": largest[1].numel(),
        "world": dist.get_world_size(),
        "source_world": DeepSpeedSource(ck).world,
        "loss": losses,
    }
    engine.destroy()


def part_adamw_save(report: dict, root: Path) -> None:
    """torch AdamW under ZeRO-2 and ZeRO-3 (the optimizer DeepSpeed's universal converter handles): the checkpoint the test
    converts with ds_to_universal, for `part_universal` to load into APOLLO."""
    W = dist.get_world_size()
    for stage in (2, 3):  # DeepSpeed's ZeRO-3 universal load wants a ZeRO-3 checkpoint's file names
        model = oracle.make_model(0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cfg = plain_config(base_config(stage, GLOBAL_BATCH // W))
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        run(engine, 0, SAVE_AT)
        engine.save_checkpoint(str(root / f"adamw_z{stage}"))
        engine.destroy()
    report["adamw/save"] = {"world": W}


def _outcome(fn) -> str:
    """ "ok", or the exception's type and message."""
    try:
        fn()
        return "ok"
    except Exception as e:  # noqa: BLE001 - the error is what is reported
        where = traceback.extract_tb(e.__traceback__)[-1]
        return f"{type(e).__name__}: {e} [at {Path(where.filename).name}:{where.lineno} {where.name}]"


def part_universal(report: dict, root: Path) -> None:
    """DeepSpeed's universal checkpoint (AdamW's, converted by the test) loaded into APOLLO with
    ``checkpoint.load_universal``: per case, what initialize / load_checkpoint / the next step do."""
    W = dist.get_world_size()

    def setup(stage: int, how: str = "plain"):
        model = oracle.make_model(1)
        opt = APOLLO(oracle.groups(model, "apollo", gap=GAP), **oracle.HPARAMS)
        cfg = base_config(stage, GLOBAL_BATCH // W)
        cfg["checkpoint"] = {"load_universal": True}
        init = ads.initialize if how == "adapter" else deepspeed.initialize
        engine, *_ = init(model=model, optimizer=opt, config=cfg if how == "adapter" else plain_config(cfg))
        return engine

    out = {"adapter/initialize": _outcome(lambda: setup(2, "adapter"))}
    for stage in (2, 3):
        load_dir = str(root / f"adamw_z{stage}")
        engine = setup(stage)
        out[f"z{stage}/apollo_dist.deepspeed.load_checkpoint"] = _outcome(lambda: ads.load_checkpoint(engine, load_dir))
        engine.destroy()
        # DeepSpeed's own engine.load_checkpoint before APOLLO's first step (nothing of APOLLO's bound yet)
        engine = setup(stage)
        out[f"z{stage}/engine.load_checkpoint/before_first_step"] = _outcome(lambda: engine.load_checkpoint(load_dir))
        out[f"z{stage}/engine.load_checkpoint/next_step"] = _outcome(lambda: run(engine, SAVE_AT, SAVE_AT + 1))
        engine.destroy()
        # ... and after it (APOLLO bound to the ZeRO layout)
        engine = setup(stage)
        run(engine, 0, 1)
        out[f"z{stage}/engine.load_checkpoint/after_a_step"] = _outcome(lambda: engine.load_checkpoint(load_dir))
        engine.destroy()
    report["universal"] = out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--save", default="")
    ap.add_argument("--load", default="")
    ap.add_argument("--bf16", default="")
    ap.add_argument("--memory", default="")
    ap.add_argument("--mem-model", default="wide")
    ap.add_argument("--universal", action="store_true")
    ap.add_argument("--adamw", action="store_true")
    ap.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    root = Path(args.dir)
    report: dict = {"world": dist.get_world_size()}
    cells = lambda s: [c for c in s.split(",") if c]  # noqa: E731
    parts = []
    if args.memory:  # first: a process that has built no other engine yet
        parts.append(("memory", lambda: part_memory(report, args.memory, root, args.mem_model)))
    if args.save:
        parts.append(("save", lambda: part_save(report, cells(args.save), root)))
    if args.load:
        parts.append(("load", lambda: part_load(report, cells(args.load), root)))
    if args.bf16:
        parts.append(("bf16", lambda: part_bf16(report, args.bf16, root)))
    if args.adamw:
        parts.append(("adamw", lambda: part_adamw_save(report, root)))
    if args.universal:
        parts.append(("universal", lambda: part_universal(report, root)))
    run_parts(report, parts, args.out)


if __name__ == "__main__":
    main()
