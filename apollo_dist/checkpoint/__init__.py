"""World-size-independent ("canonical") checkpoints of APOLLO training (DESIGN.md §4).

A canonical checkpoint is a directory::

    index.json               format name + version; the run's trainer state (data position = step,
                             lr schedule); the projection generator's device type (CPU and CUDA draw
                             different P); the optimizer's flags; the param groups (hyperparameters,
                             step, param names); per param: group, shape, initial seed, its own step
                             (version 2; version 1: the group's), projection rank r (key "rank"), the
                             projection's record ({"kind": "random", "tensors": []}: the state a projection
                             keeps besides the seed: none for random, ["projection"] for svd / dct; version 2),
                             "expert": [fused name, e] for expert slice e of a fused 3-D weight (version 3;
                             version 2 knew slices by their name "<fused name>.<e>"),
                             file, tensor shapes and dtypes; per file: size and SHA-256
    state-00001.safetensors  per param, in index order:
    ...                        <name>/weight        fp32 master weights, the param's shape
                               <name>/exp_avg       low-rank: the reference's orientation (m x r when
                               <name>/exp_avg_sq      tall, m >= n; r x n when wide); plain Adam: the param's shape
                               <name>/limiter_norm  low-rank only, shape (1,); < 0: no norm yet
                               <name>/projection    proj "svd": P (r x n tall / m x r wide, fp32);
                                                    proj "dct": the r basis indices (int64, -1: none)

It is written one parameter at a time (`write_canonical` streams safetensors files), so converting a
checkpoint never holds more than one parameter's tensors. `load_checkpoint` (alias `load_canonical`) loads it
into a bound APOLLO at any world size under any engine, each rank reading only the slices it holds
(``safe_open(...).get_slice``), and loads native checkpoints (DeepSpeed at any W, DCP, launch/train.py's step
directories) the same way, one param at a time (`open_checkpoint`). Readers of native checkpoints live in
`apollo_dist.native_checkpoints`; ``tools/convert_checkpoint.py`` is the command line (export, archiving).

Modules: `format` (what a checkpoint holds and describes), `streaming` (safetensors written tensor by
tensor, staged directories), `canonical` (writing and reading the directory), `state_dicts` (canonical
tensors assembled from APOLLO state dicts), `live` (loading into, and saving from, a live optimizer).
"""

# The public API; the modules' other names are imported from the modules themselves.
from .canonical import CanonicalCheckpoint, is_canonical, save_canonical
from .format import CheckpointError, Meta, ParamEntry, Source
from .live import LiveSource, load_canonical, load_checkpoint, open_checkpoint, resume_canonical, resume_checkpoint

__all__ = [
    "CanonicalCheckpoint",
    "CheckpointError",
    "LiveSource",
    "Meta",
    "ParamEntry",
    "Source",
    "is_canonical",
    "load_canonical",
    "load_checkpoint",
    "open_checkpoint",
    "resume_canonical",
    "resume_checkpoint",
    "save_canonical",
]
