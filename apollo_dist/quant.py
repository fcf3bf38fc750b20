"""int8 weights for Q-APOLLO (arXiv 2412.05270 §5): group-wise int8 storage, stochastic re-quantization.

The 2-D weights of the target linears (attention and MLP) are kept as int8 with one fp32 scale per
group of ``group_size`` (128, the paper's; the last group of a row may be shorter) consecutive input
elements of a row: symmetric absmax,
scale = max|w_group| / 127, w ~ q * scale. Forward and backward dequantize one layer at a time (the
fp32 weight exists only while that layer's matmuls run). Layer-wise APOLLO (apollo_dist.layerwise)
updates each such weight in its gradient hook: dequantize into a scratch fp32 matrix, run the
ordinary APOLLO update on it (the core, unchanged), re-quantize it with stochastic rounding, so that
updates smaller than half a quantization step still move the weight in expectation.

Why not a library: torchao's int8 quantized training (torchao.prototype.quantized_training) keeps
one scale per row, not per group of 128, draws its rounding noise from the global RNG (no exact resume),
and is a tensor subclass whose in-place ops the optimizer would have to go through; bitsandbytes'
blockwise quantization maps to a 256-entry code by nearest rounding (no stochastic rounding) and is
stubbed out in this repository's tests (the oracle's import). The quantizer is a few tensor ops.

Stochastic rounding is seeded by (the param's APOLLO seed, its step), so a resumed run draws the same
noise as an uninterrupted one. One process only (the paper's single-GPU setting): FSDP2 shards
parameters, not the int8 buffers; refused with a clear error.
"""

from __future__ import annotations

import weakref
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .core import Slot

GROUP_SIZE = 128  # input elements per scale (the paper's Q-APOLLO setting)
QMAX = 127  # symmetric int8: [-127, 127]


def quantize_groupwise(
    w: torch.Tensor, group_size: int = GROUP_SIZE, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of an (m, n) weight: q int8 (m, n), scale fp32 (m, ceil(n / group_size)).

    q = round(w / scale) per group of ``group_size`` consecutive elements of a row (the last group of a
    row may be shorter), scale = absmax / 127. Rounding is to nearest, or stochastic with ``generator``:
    floor(w / scale + u), u ~ U[0, 1) (unbiased: E[q * scale] = w)."""
    m, n = w.shape
    groups = -(-n // group_size)
    # zero padding of a short last group leaves its absmax unchanged
    g = nn.functional.pad(w.detach().float(), (0, groups * group_size - n)).reshape(m, groups, group_size)
    scale = g.abs().amax(dim=-1) / QMAX
    x = g / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)  # in [-127, 127]; all-zero groups stay 0
    if generator is None:
        x = x.round_()
    else:
        x = x.add_(torch.rand(x.shape, generator=generator, device=x.device)).floor_()
    return x.clamp_(-QMAX, QMAX).to(torch.int8).reshape(m, groups * group_size)[:, :n].contiguous(), scale


def dequantize_groupwise(
    q: torch.Tensor, scale: torch.Tensor, group_size: int = GROUP_SIZE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """q * scale per group of ``group_size`` (as quantized): the (m, n) weight in ``dtype``."""
    m, n = q.shape
    groups = scale.shape[1]
    w = nn.functional.pad(q.to(torch.float32), (0, groups * group_size - n)).reshape(
        m, groups, group_size
    ) * scale.unsqueeze(-1)
    return w.reshape(m, groups * group_size)[:, :n].to(dtype)


def rounding_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The stochastic-rounding noise of one re-quantization: a function of (param seed, step) only."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


class _Int8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward (never kept in between).

    The gradient of W goes to ``proxy`` (a zero-storage tensor of W's shape, the module's ``weight``
    parameter), where layer-wise APOLLO's hook picks it up."""

    @staticmethod
    def forward(ctx, x, proxy, q, scale, bias, group_size):
        ctx.save_for_backward(x, q, scale)
        ctx.has_bias, ctx.group_size = bias is not None, group_size
        return nn.functional.linear(x, dequantize_groupwise(q, scale, group_size, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, q, scale = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_groupwise(q, scale, ctx.group_size, grad_out.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, None, None, grad_b, None


class Int8Linear(nn.Module):
    """An ``nn.Linear`` whose weight is stored as int8 (``weight_int8``, out x in) with fp32 group scales
    (``weight_scale``, out x in / group_size); both are buffers, so ``state_dict`` holds them.

    ``weight`` stays a parameter of the linear's shape, with no storage (a zero expanded), so that
    param groups, APOLLO's positional seeds and gradient hooks see the model as before; it only receives
    the gradient. Train it with ``APOLLO(..., layerwise=True)``; any other optimizer would step the proxy."""

    def __init__(self, linear: nn.Linear, group_size: int, scratch: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        q, scale = quantize_groupwise(linear.weight.detach(), group_size)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        w = linear.weight
        self.weight = nn.Parameter(
            torch.zeros((), device=w.device, dtype=w.dtype).expand(w.shape), requires_grad=w.requires_grad
        )
        self.weight._apollo_quant = weakref.ref(self)  # how the binding and the hooks find the int8 storage
        self.bias = linear.bias
        self._scratch = scratch  # fp32 (out, in), shared by the model's weights of this shape: APOLLO updates it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(
            x, self.weight, self.weight_int8, self.weight_scale, self.bias, self.group_size
        )

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight the int8 storage stands for (out x in)."""
        return dequantize_groupwise(self.weight_int8, self.weight_scale, self.group_size)

    def load_scratch(self) -> None:
        """Before this weight's APOLLO update: the scratch holds its dequantized weight."""
        self._scratch.copy_(self.dequantize())

    def store_scratch(self, seed: int, step: int, skip: Optional[torch.Tensor] = None) -> None:
        """After the update: re-quantize the scratch into the int8 storage (stochastic rounding); where ``skip``
        (0-dim, on the device) > 0 the storage is kept (the update was skipped), decided on the device."""
        q, scale = quantize_groupwise(
            self._scratch, self.group_size, rounding_generator(seed, step, self._scratch.device)
        )
        if skip is None:
            self.weight_int8.copy_(q)
            self.weight_scale.copy_(scale)
            return
        keep = skip > 0
        torch.where(keep, self.weight_int8, q, out=self.weight_int8)
        torch.where(keep, self.weight_scale, scale, out=self.weight_scale)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)  # the proxy holds no values: int8 + scales are the weight

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if prefix + "weight" in state_dict:
            error_msgs.append(
                f"{prefix}weight: a float weight for an int8 layer (Int8Linear): load it into the float model, "
                "then call apollo_dist.quant.quantize_model"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 groups of {self.group_size}"


def quantize_model(
    model: nn.Module, target_modules: Iterable[str] = ("attn", "mlp"), group_size: int = GROUP_SIZE
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose name contains one of ``target_modules`` (the rule of
    ``apollo_dist.param_groups``) by an `Int8Linear`; returns the replaced names.

    Call it before building the optimizer (and before loading an int8 checkpoint). ValueError when the
    model is sharded (DTensors) or nothing matches."""
    targets = tuple(target_modules)
    scratch: dict[tuple[tuple[int, int], torch.device], torch.Tensor] = {}
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not any(t in name for t in targets):
            continue
        w = module.weight
        if type(w).__name__ == "DTensor":
            raise ValueError(
                f"int8 weights run in one process: {name}.weight is a DTensor (FSDP2); quantize the unsharded model"
            )
        key = (tuple(w.shape), w.device)
        if key not in scratch:
            scratch[key] = torch.empty(w.shape, dtype=torch.float32, device=w.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Int8Linear(module, group_size, scratch[key]))
        replaced.append(name)
    if not replaced:
        raise ValueError(f"int8 weights: no nn.Linear matches target_modules {list(targets)}")
    return replaced


def int8_module(p: torch.Tensor) -> Optional[Int8Linear]:
    """The `Int8Linear` whose ``weight`` proxy ``p`` is, else None."""
    ref = getattr(p, "_apollo_quant", None)
    return ref() if ref is not None else None


def int8_slot(p: torch.Tensor, position: int) -> Slot:
    """The slot of an int8 weight: the whole matrix, its data the shared fp32 scratch that layer-wise
    APOLLO fills (``load_scratch``) before and re-quantizes (``store_scratch``) after each update."""
    scratch = int8_module(p)._scratch
    grad = lambda p=p: None if p.grad is None else p.grad.reshape(-1)
    return Slot(p, position, tuple(p.shape), 0, p.numel(), scratch.view(-1), grad)


def refuse_int8(slots: Iterable[Slot], what: str) -> None:
    """ValueError naming ``what`` when one of ``slots`` is an int8 weight (its data is a shared scratch)."""
    for s in slots:
        if int8_module(s.param) is not None:
            raise ValueError(
                f"{what}: param {s.index} (shape {s.shape}) is an int8 weight (apollo_dist.quant), which only "
                "layer-wise APOLLO (layerwise=True) updates, and whose checkpoints are the model's and optimizer's "
                "state dicts"
            )
