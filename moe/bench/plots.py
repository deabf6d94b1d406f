"""Plots of the benchmarks' results (the `plot` extra: pip install -e '.[plot]')."""

from __future__ import annotations


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def plot_decode(path: str, result: dict) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for prompt in sorted({r["prompt_len"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["prompt_len"] == prompt]
        batches = [r["batch"] for r in rows]
        left.plot(batches, [r["decode_tokens_per_s"] for r in rows], "o-", label=f"prompt {prompt}")
        right.plot(batches, [r["mbu"] for r in rows], "o-", label=f"MBU, prompt {prompt}")
        right.plot(batches, [r["mfu"] for r in rows], "s--", label=f"MFU, prompt {prompt}")
    for ax, label in ((left, "decode tokens/s"), (right, "share of the machine's peak")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.legend()
    save(plt, fig, path)


def line_plot(path: str, rows: list[dict], series: list[tuple[str, str, str]], **axes) -> None:
    """One curve per (key, style, label) against the rows' batch sizes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style, label in series:
        ax.plot([r["batch"] for r in rows], [r[key] for r in rows], style, label=label)
    ax.set(xlabel="batch size", **axes)
    ax.legend()
    save(plt, fig, path)


def plot_experts(path: str, result: dict) -> None:
    line_plot(path, result["rows"], [("distinct", "o", "measured"), ("distinct_uniform", "-", "uniform: E(1-(1-k/E)^B)")],
              xscale="log", ylabel="distinct experts per layer per step")


def plot_speculative(path: str, result: dict) -> None:
    line_plot(path, result["rows"], [("speedup", "o-", "measured"), ("closed_form_speedup", "s--", "closed form"),
                                     ("costed_speedup", "^:", "costed (verify as measured)")],
              ylabel="speedup over plain decoding")


def plot_serving(path: str, result: dict) -> None:
    """p99 latencies against throughput, one curve per batching mode: the further right at a given
    height, the more a server serves within that latency."""
    plt = pyplot()
    panels = (("ttft_s", "time to first token"), ("per_token_s", "latency per output token"), ("itl_s", "inter-token latency"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, name) in zip(axes, panels):
        for mode, style in (("static", "s--"), ("continuous", "o-")):
            rows = [r for r in result["rows"] if r["mode"] == mode and r["served"]]
            ax.plot([r["tokens_per_s"] for r in rows], [r[key]["p99"] * 1e3 for r in rows], style, label=mode)
        ax.set(xlabel="throughput (tokens/s)", ylabel=f"p99 {name} (ms)", yscale="log")
        ax.legend()
    save(plt, fig, path)
