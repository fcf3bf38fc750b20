"""The test oracle (apollo-torch 1.0.3, CC-BY-NC: run by tests only) and a small model with awkward shapes."""

from __future__ import annotations

import torch
import torch.nn as nn

from tools.reference import oracle_class, stub_bitsandbytes  # noqa: F401  (the oracle's loader: tests import it from here)


class Block(nn.Module):
    """Tall (23x11), wide (11x23), square (11x11) weights; dims not multiples of 2 or 3; bias and norm."""

    def __init__(self, d: int = 11, h: int = 23):
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(d, d, bias=False), "o": nn.Linear(d, d, bias=True)})
        self.mlp = nn.ModuleDict({"up": nn.Linear(d, h, bias=True), "down": nn.Linear(h, d, bias=False)})
        self.norm = nn.LayerNorm(d)
        self.mlp_idle = False  # True: the MLP is left out of the graph (its params get no gradient: grad None)

    def forward(self, x):
        x = x + self.attn["o"](torch.tanh(self.attn["q"](self.norm(x))))
        if self.mlp_idle:
            return x
        return x + self.mlp["down"](torch.relu(self.mlp["up"](x)))


class TinyNet(nn.Module):
    """Embedding(37, 11) -> 2 blocks -> head (the head is not a target module: plain Adam)."""

    def __init__(self, vocab: int = 37, d: int = 11, h: int = 23, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def batch(step: int, size: int = 12, seq: int = 7, vocab: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: a function of the step only."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, vocab, (size, seq), generator=g, device="cpu")  # on CPU under any default device
    y = torch.randint(0, vocab, (size, seq), generator=g, device="cpu")
    return x, y


def loss_fn(model, x, y):
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def groups(model, preset: str, rank: int | None = None, gap: int = 7, proj: str = "random"):
    """Param groups for both optimizers (plain dicts, the reference's keys)."""
    from apollo_dist import param_groups

    gs = param_groups(
        model,
        preset=preset,
        update_proj_gap=gap,
        rank=rank if rank is not None else (5 if preset == "apollo" else 1),
        proj=proj,
    )
    for g in gs:
        g.pop("param_names", None)
    return gs


HPARAMS = dict(lr=3e-2, weight_decay=0.1, betas=(0.9, 0.999))


def named_groups(model, preset: str, **kw):
    """`groups` with ``param_names`` kept (layer-wise APOLLO then buckets each block's params together)."""
    names = {id(p): n for n, p in model.named_parameters()}
    gs = groups(model, preset, **kw)
    for g in gs:
        g["param_names"] = [names[id(p)] for p in g["params"]]
    return gs


def train(opt_cls, preset: str, steps: int = 30, seed: int = 0, **kw) -> TinyNet:
    model = make_model(seed)
    opt = opt_cls(groups(model, preset), **HPARAMS, **kw)
    for t in range(steps):
        x, y = batch(t)
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    return model


def max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    """max over params of ||a - b||_inf / ||b||_inf."""
    worst = 0.0
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        worst = max(worst, float((p - q).abs().max() / q.abs().max().clamp_min(1e-12)))
    return worst


IDLE_EVERY = 3  # the last block's MLP (a tall and a wide target weight and a bias) sits out every third step


def set_idle(model: nn.Module, t: int, every: int = IDLE_EVERY) -> bool:
    """Leave the last block's MLP out of step ``t``'s graph when t % every == every - 1 (0: never); whether it is."""
    idle = every > 0 and t % every == every - 1
    blocks = getattr(model, "blocks", None) or model.module.blocks
    blocks[-1].mlp_idle = idle
    return idle


def idle_params(model: nn.Module) -> list[nn.Parameter]:
    """The params `set_idle` leaves without gradient."""
    blocks = getattr(model, "blocks", None) or model.module.blocks
    return list(blocks[-1].mlp.parameters())


def train_idle(opt_cls, preset: str, steps: int = 12, zeros: bool = False, **kw) -> TinyNet:
    """`train` with the last block's MLP idle every third step (its grads None, as autograd leaves them);
    ``zeros``: give them zero gradients instead (what ZeRO's flat buffers hold for an unused param)."""
    model = make_model(0)
    opt = opt_cls(groups(model, preset), **{**HPARAMS, "weight_decay": 0.01}, **kw)
    for t in range(steps):
        idle = set_idle(model, t)
        loss_fn(model, *batch(t)).backward()
        if idle and zeros:
            for p in idle_params(model):
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
    return model
