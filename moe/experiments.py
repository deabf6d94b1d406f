"""python -m moe.experiments experts: the reference design's MoE claims tested by training runs.

Every point trains the same base config on the same tokens in the same order (`--steps` steps),
at equal active compute per token: attention, embeddings and the active FFN width are the
base's, only how that width is cut into experts changes.

    dense        one SwiGLU FFN of width k F (the k experts' worth a token uses)
    e8 .. e64    8, 16, 32, 64 experts of width F, top-2 (total parameters grow)
    e64-top8     64 experts of width F/4, top-8: fine-grained, the same active width
    e16-top1     16 experts of width 2F, top-1: one expert a token, the same active width

A point whose run is finished is skipped; one that was interrupted is resumed. Then a table
(final validation loss, bits per byte, tokens/s, the experts' load coefficient of variation,
dropped assignments) and a plot of validation loss against tokens for every run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .bench.plots import pyplot, save
from .cli import device_arg, positive_int, print_table, run, write_json
from .config import load_config
from .files import read_jsonl
from .plot import read_run
from .train.launch import launch


def points(config: str) -> dict[str, list[str]]:
    """Each point's overrides of `config`, at its active FFN width k F."""
    model = load_config(config).model
    F, k = model.d_ff, model.top_k
    if model.n_experts == 1 or k != 2:
        raise ValueError(f"--config {config}: the experiment needs a top-2 MoE base (it has n_experts="
                         f"{model.n_experts}, top_k={k})")
    moe = lambda n, top, width: [f"model.n_experts={n}", f"model.top_k={top}", f"model.d_ff={width}"]  # noqa: E731
    return {"dense": ["model.n_experts=1", "model.top_k=1", f"model.d_ff={k * F}"],
            **{f"e{n}": moe(n, 2, F) for n in (8, 16, 32, 64)},
            "e64-top8": moe(64, 8, F // 4), "e16-top1": moe(16, 1, 2 * F)}


def finished(out: Path) -> bool:
    """Whether the run in `out` wrote its summary (it may have stopped before any training record)."""
    path = out / "metrics.jsonl"
    return path.is_file() and any(r["type"] == "summary" for _, r in read_jsonl(path, ("type",)))


def run_point(out: Path, config: str, overrides: list[str], device: torch.device) -> None:
    """Train the point, resume it if it was interrupted, skip it if it has finished."""
    if finished(out):
        print(f"{out.name}: finished, skipped")
        return
    resume = bool(ckpt.list_checkpoints(out))
    if not resume:  # stopped before its first checkpoint: nothing to continue, so no records to keep either
        (out / "metrics.jsonl").unlink(missing_ok=True)
    launch(config, overrides, out, device, resume=resume, quiet=True)


def table_row(name: str, folder: Path) -> dict:
    train, evals, summary = read_run(folder)
    cv = train[-1].get("expert_cv")
    return {"run": name, "val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1]["val_bpb"],
            "tokens": summary["tokens_seen"], "tokens_per_s": summary["tokens_per_s"],
            "expert_cv": statistics.mean(cv) if cv else 0.0,  # at the last record, over the MoE layers
            "dropped": sum(sum(r.get("dropped") or []) for r in train)}


def plot_validation(runs: dict[str, Path], out: Path) -> None:
    """Validation loss against tokens for every run, and beside it each run's difference from the
    first (dense, when it ran) at the same evaluations: the curves alone hide gaps of 0.01 nats."""
    plt = pyplot()
    fig, (ax, diff) = plt.subplots(1, 2, figsize=(13, 4.5))
    curves = {name: {r["tokens_seen"]: r["val_loss"] for r in read_run(folder).evals} for name, folder in runs.items()}
    first, *_ = curves
    for name, curve in curves.items():
        line, = ax.plot(list(curve), list(curve.values()), "o-", label=name)
        shared = [t for t in curve if t in curves[first] and t > 0]  # step 0 is the random model
        diff.plot(shared, [curve[t] - curves[first][t] for t in shared], "o-", color=line.get_color(), label=name)
    ax.set(xlabel="tokens", ylabel="validation loss (nats per token)", title="equal active compute, equal tokens")
    diff.axhline(0, color="grey", lw=0.8)
    diff.set(xlabel="tokens", ylabel=f"validation loss minus {first}'s (nats)", title=f"against {first}")
    ax.legend()
    save(plt, fig, str(out))


def experts(args: argparse.Namespace) -> dict:
    chosen = points(args.config)
    unknown = sorted(set(args.only or ()) - set(chosen))
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: no such point (the points: {', '.join(chosen)})")
    chosen = {name: o for name, o in chosen.items() if not args.only or name in args.only}
    common = [f"train.max_steps={args.steps}", f"train.eval_every={args.eval_every}", "train.sample_tokens=0",
              *args.override]
    folders = {}
    for i, (name, overrides) in enumerate(chosen.items(), 1):
        print(f"[{i}/{len(chosen)}] {name}: {' '.join(overrides)}", flush=True)
        folders[name] = args.out / name
        run_point(folders[name], args.config, [*common, *overrides], args.device)
    rows = [table_row(name, folder) for name, folder in folders.items()]
    print_table(rows, [("run", "run", "s"), ("val_loss", "val loss", ".4f"), ("val_bpb", "bits/byte", ".4f"),
                       ("tokens", "tokens", ",d"), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("expert_cv", "expert load CV", ".3f"), ("dropped", "dropped", ",d")])
    plot_validation(folders, args.out / "validation.png")
    result = {"experiment": "experts", "config": args.config, "steps": args.steps, "rows": rows}
    write_json(str(args.out / "results.json"), result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="experiment", required=True)
    p = sub.add_parser("experts", help="dense vs 8-64 experts, fine-grained, top-1 vs top-2, at equal active compute")
    p.add_argument("--config", default="small", help="the top-2 MoE base (default small)")
    p.add_argument("--steps", type=positive_int, default=500,
                   help="training steps a point (default 500: the seven points take about 35 minutes on 2 CPU cores)")
    p.add_argument("--eval-every", type=positive_int, default=50, help="steps between evaluations (default 50)")
    p.add_argument("--out", type=Path, default=Path("runs/experiments"), help="default runs/experiments")
    p.add_argument("--only", type=lambda text: text.split(","), default=None, help="comma-separated points")
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("override", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="config overrides for every point, e.g. train.micro_batch_size=4")
    return parser


def main(argv: list[str] | None = None) -> None:
    experts(build_parser().parse_args(argv))


if __name__ == "__main__":
    run(main)
