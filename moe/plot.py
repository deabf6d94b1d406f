"""python -m moe.plot RUN [RUN ...] --out PLOT.png: what a run's metrics.jsonl says, as pictures.

Top row, every run overlaid: training and validation loss against tokens; the learning rate and
the batch-size ramp; tokens/s and MFU. Below, a row a run: each MoE layer's expert share over
training as a heatmap (a dark band is an expert the router starves). Needs the plot extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .bench.plots import pyplot, save
from .cli import run
from .files import read_jsonl


class Run(NamedTuple):
    train: list[dict]
    evals: list[dict]  # each with the tokens_seen of its step
    summary: dict | None  # None until the run has finished


def read_run(folder: str | Path) -> Run:
    """A run directory's metrics.jsonl, by kind of record."""
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no metrics.jsonl there (is it a run directory?)")
    records = [r for _, r in read_jsonl(path, ("type",))]
    train = [r for r in records if r["type"] == "train"]
    if not train:
        raise ValueError(f"{path}: no training records yet")
    tokens_at = {r["step"]: r["tokens_seen"] for r in train}
    per_step = train[0]["tokens_seen"] / train[0]["step"]
    evals = [r | {"tokens_seen": tokens_at.get(r["step"], r["step"] * per_step)} for r in records if r["type"] == "eval"]
    return Run(train, evals, next((r for r in reversed(records) if r["type"] == "summary"), None))


def plot_runs(folders: list[str | Path], out: str | Path) -> list[str]:
    """Draw the runs into `out`; returns the panels' titles, top row first."""
    plt = pyplot()
    runs = {Path(folder).name: read_run(folder) for folder in folders}
    layers = max(len(r.train[-1].get("expert_share") or []) for r in runs.values())
    columns = max(3, layers)
    fig = plt.figure(figsize=(4.5 * columns, 3.6 * (1 + (len(runs) if layers else 0))))
    grid = fig.add_gridspec(1 + (len(runs) if layers else 0), columns)
    loss, schedule, speed = (fig.add_subplot(grid[0, i]) for i in range(3))
    rate, mfu = schedule.twinx(), speed.twinx()
    for i, (name, (train, evals, _)) in enumerate(runs.items()):
        color = f"C{i}"
        tokens = [r["tokens_seen"] for r in train]
        loss.plot(tokens, [r["loss"] for r in train], color=color, alpha=0.5, label=f"{name} train")
        loss.plot([r["tokens_seen"] for r in evals], [r["val_loss"] for r in evals], "o-", color=color,
                  label=f"{name} validation")
        schedule.plot(tokens, [r["lr"] for r in train], color=color, label=name)
        rate.plot(tokens, [r["batch_size"] for r in train], "--", color=color)
        speed.plot(tokens, [r["tokens_per_s"] for r in train], color=color, label=name)
        mfu.plot(tokens, [100 * r["mfu"] for r in train], ":", color=color)
    loss.set(title="loss", xlabel="tokens", ylabel="nats per token")
    schedule.set(title="learning rate (solid) and batch size (dashed)", xlabel="tokens", ylabel="learning rate")
    rate.set_ylabel("sequences per step")
    speed.set(title="tokens/s (solid) and MFU (dotted)", xlabel="tokens", ylabel="tokens/s")
    mfu.set_ylabel(f"MFU, % of the {train[-1].get('precision', 'fp32')} peak")
    for ax in (loss, schedule, speed):
        ax.legend(fontsize="small")
    titles = [ax.get_title() for ax in (loss, schedule, speed)]
    for row, (name, (train, _, _)) in enumerate(runs.items(), 1):
        shares = [r["expert_share"] for r in train if r.get("expert_share")]
        for layer in range(len(shares[0]) if shares else 0):
            ax = fig.add_subplot(grid[row, layer])
            share_SE = np.array([s[layer] for s in shares])  # S = logged steps
            first, last = train[0]["tokens_seen"], train[-1]["tokens_seen"]
            image = ax.imshow(share_SE.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                              extent=(first, max(last, first + 1), -0.5, share_SE.shape[1] - 0.5))  # one record: a strip
            ax.set(title=f"{name}: MoE layer {layer} expert share", xlabel="tokens", ylabel="expert")
            fig.colorbar(image, ax=ax)
            titles.append(ax.get_title())
    save(plt, fig, str(out))
    return titles


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with its metrics.jsonl)")
    parser.add_argument("--out", required=True, metavar="PNG", help="where to write the picture")
    args = parser.parse_args(argv)
    plot_runs(args.runs, args.out)


if __name__ == "__main__":
    run(main)
