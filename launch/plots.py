"""Loss curves of training runs as a PNG: launch/train.py draws its own run, tools/compare_runs.py several."""

from __future__ import annotations


def ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def plot_runs(runs: dict[str, list[dict]], path: str, title: str = "", smooth: float = 0.0) -> None:
    """Train loss (EMA-smoothed) as lines and validation loss as markers, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, (label, rows) in enumerate(runs.items()):
        colour = f"C{k}"
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, ema(list(losses), smooth), color=colour, lw=1, alpha=0.8, label=f"{label} train".strip())
        if val:
            ax.plot(*zip(*val), "o--", color=colour, ms=3, lw=1, label=f"{label} validation".strip())
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
