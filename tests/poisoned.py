"""Training runs with non-finite gradients on chosen params and steps, for layer-wise APOLLO's per-param
non-finite check (tests/test_layerwise.py, and through the Triton interpreter tests/workers/layerwise_interpreted.py).

The layer-wise run's gradients of `poisoned` params are made NaN by tensor hooks at `BAD_STEPS`; the ordinary
run's are removed instead (grad None after backward), which the ordinary step skips as the reference does. So
"a param with a non-finite gradient is not updated and its step count does not advance, the others are" is the
ordinary step with that param left out. At `NAN_LOSS_STEP` both runs' loss is NaN: every gradient is non-finite,
and nothing may change (both "skip")."""

from __future__ import annotations

import warnings

import oracle
import torch

from apollo_dist import APOLLO

BAD_STEPS = (2, 6)
NAN_LOSS_STEP = 4


def poisoned(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """A low-rank weight (tall 23 x 11) and a plain-Adam one (the head)."""
    return [model.blocks[0].mlp["up"].weight, model.head.weight]


def left_out(model: torch.nn.Module, names: bool) -> list[torch.nn.Parameter]:
    """What a poisoned gradient keeps from being updated: the poisoned params, or with ``names`` (one bucket per
    block and group) the whole bucket: block 0's low-rank weights, and the head (a bucket of its own)."""
    if not names:
        return poisoned(model)
    block = model.blocks[0]
    return [
        block.attn["q"].weight,
        block.attn["o"].weight,
        block.mlp["up"].weight,
        block.mlp["down"].weight,
        model.head.weight,
    ]


def _snapshot(model: torch.nn.Module, opt: APOLLO) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for st in opt.state.values():
        tensors += [torch.as_tensor(v).clone() for k, v in sorted(st.items()) if k != "seed"]
    return tensors


def train(preset: str, layerwise: bool, steps: int = 8, names: bool = False) -> dict:
    """The model after ``steps``, each param's step count, whether the NaN-loss step changed nothing (weights,
    every state tensor, step counts: bitwise), ``skipped_steps`` and the RuntimeWarnings' messages."""
    model = oracle.make_model(0)
    bad = [False]
    for p in poisoned(model):
        p.register_hook(lambda g: g * float("nan") if bad[0] else g)
    groups = (oracle.named_groups if names else oracle.groups)(model, preset)
    opt = APOLLO(groups, **oracle.HPARAMS, layerwise=layerwise, nonfinite="skip")
    untouched = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(steps):
            bad[0] = layerwise and t in BAD_STEPS
            loss = oracle.loss_fn(model, *oracle.batch(t))
            if t == NAN_LOSS_STEP:
                opt.steps_taken  # noqa: B018  (settles the last step: its counts are final)
                before = _snapshot(model, opt)
                loss = loss * float("nan")
            loss.backward()
            if not layerwise and t in BAD_STEPS:
                for p in left_out(model, names):
                    p.grad = None  # the ordinary step skips a param without gradient
            opt.step()
            opt.zero_grad()
            if t == NAN_LOSS_STEP:
                opt.steps_taken  # noqa: B018
                untouched = all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt)))
        skipped = opt.skipped_steps  # settles the last step ("skip" reads its flags at the next call)
        steps_of = [int(opt.state[p]["step"]) for p in model.parameters()]
    return {
        "model": model,
        "steps": steps_of,
        "untouched": untouched,
        "skipped": skipped,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    }
