"""A tiny mixture-of-experts model in two forms for the fused-expert tests: experts fused as transformers 5.x
stores them (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) and the same model with one ``nn.Linear``
per expert and projection (what apollo-torch can run). Routing is a fixed function of the token ids, so both
forms route identically whatever their weights: expert 6 never gets a token, expert 7 sits out every third step."""

from __future__ import annotations

import oracle
import torch
import torch.nn as nn
import torch.nn.functional as F

E, H, FF, VOCAB = 8, 11, 13, 37  # gate_up slices 26 x 11 (tall), down slices 11 x 13 (wide)
NEVER, QUIET = 6, 7  # an expert no token reaches; one that no token reaches every third step
QUIET_EVERY = 3


def routes(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-2 experts, their weights) per token: a fixed table; tokens 0 and 1 go to QUIET, none to NEVER."""
    v = torch.arange(VOCAB)
    first = v % 6  # experts 0..5
    second = torch.where(v < 2, torch.full_like(v, QUIET), (v * 5 + 1) % 6)
    second = torch.where(second == first, (first + 1) % 6, second)
    weights = torch.stack([0.5 + 0.4 * torch.cos(v.float()), 0.5 - 0.4 * torch.cos(v.float())], -1)
    return torch.stack([first, second], -1)[tokens], weights[tokens]


class FusedExperts(nn.Module):
    def __init__(self, experts: int = E):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * FF, H) / H**0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, H, FF) / FF**0.5)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, top: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return run_experts(self, x, top, weight)


class UnfusedExperts(nn.Module):
    """One Linear(H, 2I) (gate and up together) and one Linear(FF, H) per expert, listed projection by projection
    (the order of positions a fused weight's expert slices take)."""

    def __init__(self, fused: FusedExperts):
        super().__init__()
        experts = fused.gate_up_proj.shape[0]
        self.gate_up_proj = nn.ModuleList(nn.Linear(H, 2 * FF, bias=False) for _ in range(experts))
        self.down_proj = nn.ModuleList(nn.Linear(FF, H, bias=False) for _ in range(experts))
        with torch.no_grad():
            for e in range(experts):
                self.gate_up_proj[e].weight.copy_(fused.gate_up_proj[e])
                self.down_proj[e].weight.copy_(fused.down_proj[e])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj[e](x).chunk(2, dim=-1)
        return self.down_proj[e](F.silu(gate) * up)

    def forward(self, x: torch.Tensor, top: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return run_experts(self, x, top, weight)


def run_experts(experts: nn.Module, x: torch.Tensor, top: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Only the experts that got tokens run (as Mixtral's loop): (tokens, H) -> (tokens, H)."""
    out = torch.zeros_like(x)
    for e in torch.unique(top).tolist():
        tok, k = torch.where(top == e)
        out = out.index_add(0, tok, experts.expert(e, x[tok]) * weight[tok, k, None])
    return out


class MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(H, H, bias=False), "o": nn.Linear(H, H, bias=True)})
        self.norm = nn.LayerNorm(H)
        self.mlp = nn.Module()
        self.mlp.experts = FusedExperts()

    def forward(self, x: torch.Tensor, top: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = x + self.attn["o"](torch.tanh(self.attn["q"](self.norm(x))))
        out = self.mlp.experts(x.reshape(-1, H), top.reshape(-1, 2), weight.reshape(-1, 2))
        return x + out.view_as(x)


class MoENet(nn.Module):
    """Embedding -> 2 MoE blocks -> head; ``unfused()`` gives the same model with per-expert Linears."""

    def __init__(self, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, H)
        self.blocks = nn.ModuleList(MoEBlock() for _ in range(layers))
        self.head = nn.Linear(H, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        top, weight = routes(tokens.cpu())
        top, weight = top.to(tokens.device), weight.to(tokens.device)
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x, top, weight)
        return self.head(x)

    def unfused(self) -> "MoENet":
        twin = make_model(fused=True)
        twin.load_state_dict(self.state_dict())
        for b in twin.blocks:
            b.mlp.experts = UnfusedExperts(b.mlp.experts)
        return twin


class FewExpertsNet(nn.Module):
    """Embedding -> 2 fused experts (every token to both, weights 0.7 / 0.3) -> head: E = 2 < W = 3, so under
    FSDP2 one rank holds no expert."""

    def __init__(self, fused: bool = True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, H)
        self.experts = FusedExperts(experts=2)
        self.head = nn.Linear(H, VOCAB, bias=False)
        if not fused:
            self.experts = UnfusedExperts(self.experts)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).reshape(-1, H)
        top = torch.tensor([[0, 1]], device=x.device).expand(x.shape[0], 2)
        weight = torch.tensor([[0.7, 0.3]], device=x.device).expand(x.shape[0], 2)
        return self.head(x + self.experts(x, top, weight)).view(*tokens.shape, VOCAB)


def make_few(seed: int = 0, fused: bool = True) -> FewExpertsNet:
    torch.manual_seed(seed)
    return FewExpertsNet(fused)


def make_model(seed: int = 0, fused: bool = True) -> MoENet:
    torch.manual_seed(seed)
    model = MoENet()
    return model if fused else model.unfused()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`oracle.batch`, with tokens 0 and 1 (QUIET's) replaced every third step."""
    x, y = oracle.batch(step, vocab=VOCAB)
    if step % QUIET_EVERY == QUIET_EVERY - 1:
        x = torch.where(x < 2, x + 2, x)
    return x, y


def train(model: MoENet, opt_cls, preset: str, steps: int = 30, **kw) -> MoENet:
    opt = opt_cls(oracle.groups(model, preset), **oracle.HPARAMS, **kw)
    for t in range(steps):
        oracle.loss_fn(model, *batch(t)).backward()
        opt.step()
        opt.zero_grad()
    return model


def fused_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with per-expert Linears stacked back into fused tensors (comparable by name)."""
    out: dict = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if "experts" in parts and parts[-1] == "weight":  # ...experts.gate_up_proj.3.weight
            key = ".".join(parts[:-2])
            out.setdefault(key, []).append(t)  # experts in order
        else:
            out[name] = t
    return {k: torch.stack(v) if isinstance(v, list) else v for k, v in out.items()}


def max_rel_diff(a: MoENet, b: MoENet) -> float:
    """max over params of ||a - b||_inf / ||b||_inf, fused or not."""
    sa, sb = fused_state(a), fused_state(b)
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max() / sb[k].abs().max().clamp_min(1e-12)) for k in sa)
