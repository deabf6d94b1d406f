"""`bench.py serve`: a load generator against the OpenAI server, continuous batching against the
static engine under the same load.

Requests arrive as a Poisson process (exponential gaps at a given rate), each a greedy completion
of a random prompt whose output length follows a Pareto tail (most short, a few long: the load
static batching handles worst, since a batch lasts as long as its longest member). Each request
streams, so the client sees its time to first token and the gaps between tokens. Everything runs
on 127.0.0.1, every load bounded in requests and in seconds.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import dataclass, field

import numpy as np

from ..serve.process import ServerProcess
from .benchmarks import pareto_lengths

try:
    import httpx
except ImportError:  # the serve extra
    httpx = None


@dataclass
class Arrival:
    at_s: float  # after the load's start
    prompt: list[int]
    max_tokens: int


@dataclass
class Timing:
    arrival: Arrival
    sent_s: float = 0.0
    token_s: list[float] = field(default_factory=list)  # when each streamed chunk arrived
    tokens: int = 0
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.error is None and self.tokens == self.arrival.max_tokens


def poisson_load(n: int, rate: float, vocab_size: int, context: int, seed: int = 0,
                 prompt_lens: tuple[int, int] = (16, 64), min_new: int = 4, max_new: int = 160) -> list[Arrival]:
    """n requests at `rate` a second on average; output lengths min_new * (1 + Pareto(1.2)), capped
    at max_new and by the context (prompts take at most half of it)."""
    rng = np.random.default_rng(seed)
    longest = min(prompt_lens[1], context // 2)
    prompt_lens = (min(prompt_lens[0], longest), longest)
    at = np.cumsum(rng.exponential(1 / rate, n)) - 1 / rate
    lengths = pareto_lengths(rng, n, min_new, max_new)
    arrivals = []
    for t, length in zip(at, lengths):
        prompt_len = int(rng.integers(prompt_lens[0], prompt_lens[1] + 1))
        prompt = rng.integers(5, vocab_size, prompt_len).tolist()  # past the special tokens
        arrivals.append(Arrival(float(t), prompt, int(min(length, context - prompt_len))))
    return arrivals


async def _one(http, url: str, model: str, arrival: Arrival, start: float, timing: Timing) -> None:
    await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
    timing.sent_s = time.perf_counter()
    body = {"model": model, "prompt": arrival.prompt, "max_tokens": arrival.max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                timing.error = f"HTTP {response.status_code}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    timing.tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"]:
                    timing.token_s.append(time.perf_counter())
    except (httpx.HTTPError, TimeoutError) as e:
        timing.error = type(e).__name__


async def drive(url: str, model: str, arrivals: list[Arrival], timeout_s: float) -> tuple[list[Timing], float]:
    """Send every arrival on time; (timings, seconds from the first arrival to the last token)."""
    timings = [Timing(a) for a in arrivals]
    limits = httpx.Limits(max_connections=len(arrivals), max_keepalive_connections=len(arrivals))
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as http:
        start = time.perf_counter()
        tasks = [asyncio.create_task(_one(http, url, model, a, start, t)) for a, t in zip(arrivals, timings)]
        _, late = await asyncio.wait(tasks, timeout=timeout_s + arrivals[-1].at_s)
        for task in late:  # the load's time ran out: these count as not served
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    ends = [t.token_s[-1] for t in timings if t.token_s]
    return timings, (max(ends) - start) if ends else float("nan")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def summarize(timings: list[Timing], seconds: float) -> dict:
    served = [t for t in timings if t.done]
    ttft = [t.token_s[0] - t.sent_s for t in served]
    latency = [t.token_s[-1] - t.sent_s for t in served]
    per_token = [(t.token_s[-1] - t.sent_s) / t.tokens for t in served]  # Orca's normalised latency
    gaps = [b - a for t in served for a, b in zip(t.token_s, t.token_s[1:])]
    return {"requests": len(timings), "served": len(served), "tokens": sum(t.tokens for t in served),
            "seconds": seconds, "tokens_per_s": sum(t.tokens for t in served) / seconds,
            "ttft_s": percentiles(ttft), "itl_s": percentiles(gaps), "latency_s": percentiles(latency),
            "per_token_s": percentiles(per_token),
            "errors": sorted({t.error for t in timings if t.error})}


def wait_idle(server: ServerProcess, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while server.metric("moe_running_requests") + server.metric("moe_queue_depth") > 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server was still busy {timeout_s:.0f} s after the load ended")
        time.sleep(0.2)


def serve_benchmark(checkpoint: str, model_name: str, vocab_size: int, context: int, rates: list[float],
                    requests: int, slots: int, timeout_s: float, seed: int = 0, server_args: tuple[str, ...] = (),
                    say=None) -> dict:
    """Each mode's server in turn, each rate's load against it (the same arrivals for both modes)."""
    if httpx is None:
        raise ValueError("bench.py serve needs the serve extra: pip install -e '.[serve]'")
    say = say or functools.partial(print, flush=True)  # a line a load, as it ends
    rows = []
    for mode in ("static", "continuous"):
        args = ["--checkpoint", checkpoint, "--slots", str(slots), "--max-queue", str(requests),
                "--model-name", model_name, "--log-level", "warning", *server_args]
        with ServerProcess(args + (["--static"] if mode == "static" else [])) as server:
            warm = poisson_load(2, 100.0, vocab_size, context, seed=seed + 1)
            asyncio.run(drive(server.url, model_name, warm, timeout_s))
            for rate in rates:
                arrivals = poisson_load(requests, rate, vocab_size, context, seed=seed)
                timings, seconds = asyncio.run(drive(server.url, model_name, arrivals, timeout_s))
                row = {"mode": mode, "rate": rate, **summarize(timings, seconds)}
                rows.append(row)
                say(f"{mode:>10} at {rate:g} requests/s: {row['served']}/{row['requests']} served, "
                    f"{row['tokens_per_s']:,.0f} tokens/s, latency p99 {row['latency_s']['p99']:.2f} s, "
                    f"TTFT p99 {row['ttft_s']['p99']:.2f} s")
                wait_idle(server)
    return {"benchmark": "serve", "slots": slots, "requests_per_rate": requests, "rows": rows,
            "at_equal_p99": {key: at_equal_latency(rows, key) for key in LATENCIES}}


LATENCIES = {"ttft_s": "time to first token", "per_token_s": "latency per output token",
             "latency_s": "request latency"}


def at_equal_latency(rows: list[dict], key: str) -> list[dict]:
    """For each static point, continuous batching's throughput at the same p99 latency, read off
    its own throughput-latency curve (linear between measured points; where static's p99 is beyond
    every continuous point, continuous's best measured throughput, a lower bound)."""
    curve = sorted((r[key]["p99"], r["tokens_per_s"]) for r in rows if r["mode"] == "continuous" and r["served"])
    out = []
    for row in (r for r in rows if r["mode"] == "static" and r["served"]):
        p99 = row[key]["p99"]
        below = [tps for lat, tps in curve if lat <= p99]
        if not below:
            continue
        above = [(lat, tps) for lat, tps in curve if lat > p99]
        best, bound = max(below), bool(not above)
        if above:  # between the last point within p99 and the next one beyond it
            (l0, t0), (l1, t1) = max((lat, tps) for lat, tps in curve if lat <= p99), min(above)
            best = max(best, t0 + (t1 - t0) * (p99 - l0) / (l1 - l0))
        out.append({"rate": row["rate"], "p99_s": p99, "static_tokens_per_s": row["tokens_per_s"],
                    "continuous_tokens_per_s": best, "ratio": best / row["tokens_per_s"], "lower_bound": bound})
    return out
