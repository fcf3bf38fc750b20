"""Offline readers of native checkpoints (no process group, no engine): DeepSpeed ZeRO-1/2/3 and
FSDP2's torch.distributed.checkpoint (DCP). Each is a `apollo_dist.checkpoint.Source`: its ``meta``
describes the run, ``read(entry)`` gives one parameter's canonical tensors, reading only that
parameter's pieces, so `write_canonical` converts a checkpoint of any size one parameter at a time.

DeepSpeed keeps, per rank, the APOLLO state dict (with its ``apollo_layout``: every param's held
elements and owned channels on that rank, see `APOLLO.layout`) and the rank's flat fp32 partitions;
where each param sits in a partition comes from DeepSpeed's own bookkeeping (ZeRO-1/2: the
``param_slice_mappings`` it saves; ZeRO-3: ceil(numel / W) chunks laid end to end in ``param_shapes``
order, as its zero_to_fp32.py reads them). DCP checkpoints hold global (DTensor) shapes already.

DeepSpeed's files are pickles: open only checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .checkpoint.canonical import CanonicalCheckpoint
from .checkpoint.format import CheckpointError, Meta, ParamEntry, group_hyperparameters, jsonable
from .checkpoint.state_dicts import RankState, assemble_param, meta_from_state_dicts
from .experts import expert_count, expert_name

# What a training script may leave in a native checkpoint's step directory for the conversion to carry
# over (launch/train.py writes it): a JSON object with "step" (the data position), "scheduler" (the lr
# scheduler's state dict), "world_size" and "format" (the script's own tag, dropped); every other key
# is kept, opaque, as the canonical trainer state's "run". Absent: no trainer state but what the engine saved.
TRAINER_FILE = "trainer.json"
_DS_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _trainer_json(step_dir: Path) -> dict[str, Any]:
    """The `TRAINER_FILE` of ``step_dir``, or {} when there is none."""
    path = step_dir / TRAINER_FILE
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def _trainer_state(run: dict[str, Any], step: Optional[int], scheduler: Any) -> dict[str, Any]:
    """The canonical trainer state: data position, lr schedule state, and the run's other keys."""
    run = {k: v for k, v in run.items() if k not in ("format", "step", "scheduler")}
    return {"step": step, "scheduler": jsonable(scheduler) if scheduler is not None else None, "run": jsonable(run)}


# -- DeepSpeed -------------------------------------------------------------------------------------
def resolve_deepspeed_dir(path: Path, tag: Optional[str] = None) -> Path:
    """The step directory of a DeepSpeed checkpoint: ``path/tag``, ``path/<latest>``, or ``path`` itself."""
    path = Path(path)
    if tag is not None:
        step_dir = path / tag
        if not step_dir.is_dir():
            raise CheckpointError(f"{path}: no checkpoint tag {tag!r} ({step_dir} does not exist)")
        return step_dir
    if (path / "latest").is_file() and not any(_DS_OPTIM.match(p.name) for p in path.iterdir()):
        tag = (path / "latest").read_text().strip()
        step_dir = path / tag
        if not step_dir.is_dir():
            raise CheckpointError(f"{path / 'latest'} names tag {tag!r}, but {step_dir} does not exist")
        return step_dir
    return path


def is_deepspeed_dir(path: Path) -> bool:
    try:
        step_dir = resolve_deepspeed_dir(path)
    except CheckpointError:
        return False
    return step_dir.is_dir() and any(_DS_OPTIM.match(p.name) for p in step_dir.iterdir())


class _RankFile:
    """One rank's optimizer file, memory-mapped; `release` unmaps it so that the pages read for one
    parameter leave the process (what keeps peak RSS at about one parameter)."""

    def __init__(self, path: Path):
        self.path = path
        self._sd: Optional[dict] = None

    @property
    def sd(self) -> dict:
        if self._sd is None:
            try:
                self._sd = torch.load(self.path, map_location="cpu", mmap=True, weights_only=False)[
                    "optimizer_state_dict"
                ]
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file
                raise CheckpointError(
                    f"{self.path}: cannot be read as a DeepSpeed optimizer file ({type(e).__name__}: {e})"
                ) from e
        return self._sd

    def release(self) -> None:
        self._sd = None


class DeepSpeedSource:
    """A DeepSpeed checkpoint (ZeRO stage 1, 2 or 3, any world size) written with APOLLO through
    apollo_dist.deepspeed. ``path``: a save directory (``latest`` names the tag) or a step directory."""

    def __init__(self, path: Path, tag: Optional[str] = None):
        self.dir = resolve_deepspeed_dir(Path(path), tag)
        files = {}
        for p in sorted(self.dir.iterdir()):
            m = _DS_OPTIM.match(p.name)
            if m:
                if int(m.group(2)) != 0:
                    raise CheckpointError(f"{p}: model-parallel checkpoints (mp_rank > 0) are not supported")
                files[int(m.group(1))] = p
        if not files:
            raise CheckpointError(f"{self.dir}: no DeepSpeed optimizer files (*zero_pp_rank_*_optim_states.pt)")
        first = _RankFile(files[min(files)])
        apollo_sd = self._apollo_sd(first)
        world = int(apollo_sd["apollo_layout"]["world_size"])
        for r in range(world):
            if r not in files:
                name = files[min(files)].name.replace(f"zero_pp_rank_{min(files)}_", f"zero_pp_rank_{r}_")
                raise CheckpointError(f"{self.dir / name}: missing (the checkpoint was written by {world} ranks)")
        extra = sorted(set(files) - set(range(world)))
        if extra:
            raise CheckpointError(f"{files[extra[0]]}: rank {extra[0]} in a checkpoint written by {world} ranks")
        self.world = world
        self.ranks = [_RankFile(files[r]) for r in range(world)]
        self.stage = self._stage(first.sd)
        model_file = self.dir / (
            "zero_pp_rank_0_mp_rank_00_model_states.pt" if self.stage == 3 else "mp_rank_00_model_states.pt"
        )
        if not model_file.is_file():
            raise CheckpointError(f"{model_file}: missing (DeepSpeed's model states of this checkpoint)")
        self.model_file = model_file
        model_states = torch.load(model_file, map_location="cpu", mmap=True, weights_only=False)
        self.param_shapes = [dict(g) for g in model_states["param_shapes"]]
        names = self._names(apollo_sd)
        run = _trainer_json(self.dir)
        step = model_states.get("step", run.get("step", model_states.get("global_steps")))
        # The lr schedule: DeepSpeed's when it stepped one, else the training script's (TRAINER_FILE).
        sched = model_states.get("lr_scheduler")
        trainer = _trainer_state(run, step, sched if sched is not None else run.get("scheduler"))
        source = {"engine": f"deepspeed-zero{self.stage}", "path": str(self.dir)}
        self.meta, self._index = meta_from_state_dicts(apollo_sd, names, trainer, source)
        if len(self.param_shapes) != len(
            self.meta.groups
        ):  # apollo_dist.deepspeed keeps one ZeRO-3 sub-group per group
            raise CheckpointError(
                f"{model_file}: {len(self.param_shapes)} DeepSpeed param groups, the optimizer has {len(self.meta.groups)}"
            )
        self._offsets = self._zero3_offsets() if self.stage == 3 else None
        del model_states
        first.release()

    @staticmethod
    def _apollo_sd(rank_file: _RankFile) -> dict:
        osd = rank_file.sd
        sd = osd.get("base_optimizer_state", osd.get("optimizer_state_dict"))
        if not isinstance(sd, dict) or "apollo_layout" not in sd:
            raise CheckpointError(
                f"{rank_file.path}: no APOLLO layout in the optimizer state (not written by apollo_dist's APOLLO, "
                "or by a version before layouts were saved)"
            )
        return sd

    @staticmethod
    def _stage(osd: dict) -> int:
        stage = osd.get("zero_stage")
        return int(getattr(stage, "value", stage))

    def _names(self, apollo_sd: dict) -> list[str]:
        """Param names in state-dict index order: the groups' param_names, else DeepSpeed's param_shapes."""
        names: list[str] = []
        for gi, g in enumerate(apollo_sd["param_groups"]):
            given = g.get("param_names")
            if given is None:
                if gi >= len(self.param_shapes) or len(self.param_shapes[gi]) != len(g["params"]):
                    raise CheckpointError(
                        f"{self.dir}: param group {gi} has no param_names and DeepSpeed's param_shapes do not match it"
                    )
                given = list(self.param_shapes[gi])
            names.extend(given)
        return names

    def _zero3_offsets(self) -> dict[str, int]:
        """ZeRO-3: where each param's chunk starts in its group's flat fp32 partition (same on every rank)."""
        offsets = {}
        for shapes in self.param_shapes:
            off = 0
            for name, shape in shapes.items():
                offsets[name] = off
                off += -(-math.prod(shape) // self.world)
        return offsets

    def _master(self, rank: int, entry: ParamEntry, a: int, b: int) -> torch.Tensor:
        osd = self.ranks[rank].sd
        if self.stage == 3:
            flat, off = osd["fp32_flat_groups"][entry.group], self._offsets[entry.name]
        else:
            flat = osd["single_partition_of_fp32_groups"][entry.group]
            frag = osd["param_slice_mappings"][entry.group].get(entry.name)
            if frag is None:
                raise CheckpointError(
                    f"{self.ranks[rank].path}: DeepSpeed has no slice of {entry.name} on this rank, the APOLLO layout has one"
                )
            if frag.numel != b - a:
                raise CheckpointError(
                    f"{self.ranks[rank].path}: {entry.name}: DeepSpeed's slice has {frag.numel} elements, the APOLLO layout {b - a}"
                )
            off = frag.start
        if off + (b - a) > flat.numel():
            raise CheckpointError(
                f"{self.ranks[rank].path}: {entry.name}: its slice ends past the flat partition (truncated?)"
            )
        return flat[off : off + (b - a)].float()

    def read(self, entry: ParamEntry) -> dict[str, torch.Tensor]:
        try:
            ranks = []
            for r, rf in enumerate(self.ranks):
                sd = self._apollo_sd(rf)
                ranks.append(
                    RankState(
                        str(rf.path),
                        sd["apollo_layout"],
                        sd["state"],
                        lambda idx, e, a, b, r=r: self._master(r, e, a, b),
                    )
                )
            return assemble_param(entry, self._index[entry.name], ranks)
        finally:
            for rf in self.ranks:
                rf.release()


@contextlib.contextmanager
def _quiet_no_dist() -> Iterator[None]:
    """DCP warns that it reads in a single process: that is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to load in a single process")
        yield


# -- FSDP2 / DCP -----------------------------------------------------------------------------------
def is_dcp_dir(path: Path) -> bool:
    return (Path(path) / ".metadata").is_file()


class DCPSource:
    """A torch.distributed.checkpoint directory holding ``get_state_dict(model, APOLLO)`` as
    ``{"model": ..., "optim": ...}`` (e.g. launch/train.py's FSDP2 checkpoints; other top-level names are
    found by their shape), read one tensor at a time without a process group."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = Path(path)
        if not is_dcp_dir(self.dir):
            raise CheckpointError(f"{self.dir}: not a DCP checkpoint (no .metadata)")
        try:
            self.md = FileSystemReader(str(self.dir)).read_metadata()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.dir / '.metadata'}: cannot be read ({type(e).__name__}: {e})") from e
        self._check_files()
        paths = {k: tuple(self.md.planner_data.get(k, (k,))) for k in self.md.state_dict_metadata}
        optim = {p[0] for p in paths.values() if len(p) == 4 and p[1] == "state"}
        if len(optim) != 1:
            raise CheckpointError(
                f"{self.dir}: expected one optimizer state in the checkpoint, found {sorted(optim) or 'none'}"
            )
        self.optim = optim.pop()
        wanted = {k for k, p in paths.items() if p[0] == self.optim and (not self._is_tensor(k) or p[-1] == "step")}
        groups: dict[int, dict[str, Any]] = {}
        state: dict[str, dict[str, Any]] = {}
        for k, v in self._load_objects(wanted, paths).items():
            p = paths[k]
            if p[1] == "param_groups":
                groups.setdefault(int(p[2]), {})[p[3]] = v
            elif p[1] == "state":
                state.setdefault(p[2], {})[p[3]] = v
        self.groups = [groups[i] for i in sorted(groups)]
        names = {n for g in self.groups for n in g["params"]}
        models = {p[0] for p in paths.values() if len(p) == 2 and p[1] in names}
        if len(models) != 1:
            raise CheckpointError(
                f"{self.dir}: expected the model's weights under one key, found {sorted(models) or 'none'}"
            )
        self.model = models.pop()
        params, meta_groups = [], []
        for gi, g in enumerate(self.groups):
            # per param: a param without gradient in a step is skipped, so a group's params may differ
            steps = {n: torch.as_tensor(state[n]["step"]).reshape(-1) for n in g["params"]}
            meta_groups.append(
                {**group_hyperparameters(g), "step": max((int(s.max()) for s in steps.values()), default=0)}
            )
            for n in g["params"]:
                shape = tuple(self.md.state_dict_metadata[f"{self.model}.{n}"].size)
                seed, proj = int(state[n]["seed"]), g.get("proj", "random") if "rank" in g else "random"
                for e in range(expert_count(shape, g.get("rank") is not None)):  # fused experts: one entry per slice
                    params.append(
                        ParamEntry(
                            expert_name(n, e), gi, shape[1:], seed + e, g.get("rank"), int(steps[n][e]), proj, (n, e)
                        )
                    )
                if not expert_count(shape, g.get("rank") is not None):
                    params.append(ParamEntry(n, gi, shape, seed, g.get("rank"), int(steps[n][0]), proj))
        run = _trainer_json(self.dir)
        first = self.groups[0] if self.groups else {}
        world = len({int(m.group(1)) for f in self._files() if (m := re.match(r"__(\d+)_\d+\.distcp$", f))})
        self.meta = Meta(
            params,
            meta_groups,
            str(first.get("generator_device", "cpu")),
            {"scale_front": bool(first.get("scale_front", False)), "disable_nl": bool(first.get("disable_nl", False))},
            _trainer_state(run, run.get("step"), run.get("scheduler")),
            {"engine": "fsdp2", "path": str(self.dir), "world_size": run.get("world_size", world)},
        )
        if "generator_device" not in first:
            warnings.warn(f"{self.dir}: no generator_device in the optimizer state; assuming cpu", stacklevel=2)

    def _files(self) -> set[str]:
        return {getattr(v, "relative_path", None) for v in self.md.storage_data.values()} - {None}

    def _check_files(self) -> None:
        for f in sorted(self._files()):
            if not (self.dir / f).is_file():
                raise CheckpointError(f"{self.dir / f}: missing (named in {self.dir / '.metadata'})")
        ends: dict[str, int] = {}
        for v in self.md.storage_data.values():
            ends[v.relative_path] = max(ends.get(v.relative_path, 0), v.offset + v.length)
        for f, end in ends.items():
            size = (self.dir / f).stat().st_size
            if size < end:
                raise CheckpointError(f"{self.dir / f}: {size} bytes, the metadata needs {end} (truncated)")

    def _is_tensor(self, key: str) -> bool:
        return hasattr(self.md.state_dict_metadata[key], "size")

    def _load_objects(self, keys: set[str], paths: dict[str, tuple]) -> dict[str, Any]:
        """Non-tensor items and small tensors, by flattened key (one read of the metadata-named items)."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        # What DCP's own _load_state_dict_from_keys does, but never collective (no_dist).
        nested: dict[str, Any] = {}
        with _quiet_no_dist():
            _load_state_dict(
                nested, FileSystemReader(str(self.dir)), planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True
            )
        out = {}
        for k in keys:
            v = nested
            for part in paths[k]:
                v = v[part]
            out[k] = v
        return out

    def _tensor(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        md = self.md.state_dict_metadata.get(key)
        if md is None:
            raise CheckpointError(f"{self.dir}: no {key}")
        t = torch.empty(md.size, dtype=md.properties.dtype)
        try:
            with _quiet_no_dist():
                dcp.load({key: t}, checkpoint_id=str(self.dir), no_dist=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.dir}: cannot read {key} ({type(e).__name__}: {str(e)[:300]})") from e
        return t

    def read(self, entry: ParamEntry) -> dict[str, torch.Tensor]:
        name, e = entry.expert or (entry.name, None)
        pick = (lambda t: t) if e is None else (lambda t: t[e])  # noqa: E731 (an expert slice of a fused weight)
        st = f"{self.optim}.state.{name}"
        out = {"weight": pick(self._tensor(f"{self.model}.{name}").float())}
        for k in ("exp_avg", "exp_avg_sq"):
            t = pick(self._tensor(f"{st}.{k}").float())
            # DTensor state is channel-major (C x r): wide params go back to the reference's r x n.
            out[k] = t.t().contiguous() if entry.lowrank and entry.shape[0] < entry.shape[1] else t
        if entry.lowrank:
            out["limiter_norm"] = pick(self._tensor(f"{st}.limiter_norm").float().reshape(-1)).reshape(1)
            if "projection" in entry.tensor_shapes():  # svd / dct: the same plain tensor on every rank
                out["projection"] = self._tensor(f"{st}.projection").to(entry.dtype("projection"))
        return out


def open_source(path: Path, tag: Optional[str] = None):
    """The checkpoint at ``path`` as a Source: canonical, DeepSpeed (``latest`` or ``tag``) or DCP."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if (path / "index.json").is_file():
        return CanonicalCheckpoint(path)
    if is_deepspeed_dir(path) or tag is not None:
        return DeepSpeedSource(path, tag)
    if is_dcp_dir(path):
        return DCPSource(path)
    if (path / "latest").is_file():
        inner = path / (path / "latest").read_text().strip()
        if is_dcp_dir(inner):
            return DCPSource(inner)
    raise CheckpointError(f"{path}: neither a canonical, a DeepSpeed nor a DCP checkpoint")
