"""Overlay the loss curves of several training runs and print a table.

    python tools/compare_runs.py runs/adamw.jsonl runs/apollo.jsonl --labels AdamW,APOLLO --out cmp.png

Each input is a --metrics-file of launch/train.py (JSON lines with step, loss and, on evaluation
steps, val_loss). Train losses are smoothed with an exponential moving average (--smooth) for the
plot; the table reports the final validation loss, its perplexity, the best validation loss, the
last train loss and the mean tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Optional

from launch.plots import plot_runs


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics file; a later row for the same step (after a resume) replaces the earlier."""
    if not os.path.isfile(path):
        raise SystemExit(f"compare_runs: no such metrics file: {path}")
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"compare_runs: {path} line {n} is not JSON ({e})")
            by_step.setdefault(row["step"], {}).update(row)
    return [by_step[k] for k in sorted(by_step)]


def summary(rows: list[dict]) -> dict[str, Optional[float]]:
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    train = [r["loss"] for r in rows if "loss" in r]
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return {
        "final_val": val[-1] if val else None,
        "final_ppl": math.exp(val[-1]) if val else None,
        "best_val": min(val) if val else None,
        "last_train": train[-1] if train else None,
        "tokens_per_s": sum(tps) / len(tps) if tps else None,
        "steps": rows[-1]["step"] if rows else 0,
    }


def table(runs: dict[str, list[dict]]) -> str:
    f = lambda v, spec=".4f": "-" if v is None else format(v, spec)
    lines = [
        "| run | steps | final val loss | val ppl | best val loss | last train loss | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rows in runs.items():
        s = summary(rows)
        lines.append(
            f"| {label} | {s['steps']} | {f(s['final_val'])} | {f(s['final_ppl'], '.2f')} | {f(s['best_val'])} | {f(s['last_train'])} | {f(s['tokens_per_s'], '.0f')} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", nargs="+", help="metrics files (JSON lines) of launch/train.py")
    ap.add_argument("--labels", help="comma-separated labels (default: file names)")
    ap.add_argument("--out", default="compare.png", help="PNG to write")
    ap.add_argument("--title", default="")
    ap.add_argument("--smooth", type=float, default=0.9, help="EMA factor for train losses in the plot")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [os.path.splitext(os.path.basename(m))[0] for m in args.metrics]
    if len(labels) != len(args.metrics):
        raise SystemExit(f"compare_runs: {len(labels)} labels for {len(args.metrics)} metrics files")
    runs = {label: read_metrics(m) for label, m in zip(labels, args.metrics)}
    plot_runs(runs, args.out, args.title, args.smooth)
    print(table(runs))
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
