"""The server's metrics, in Prometheus' text format at GET /metrics (prometheus_client).

Each server has its own registry, so several in one process (tests) do not mix.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from ..config import ModelConfig
from ..infer.engine import StepRecord

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_WINDOW_S = 10.0  # moe_generation_tokens_per_second averages over the last this many seconds
disable_created_metrics()  # no `_created` timestamp series beside every counter (one per expert and layer)


class ServerMetrics:
    def __init__(self, cfg: ModelConfig, slots: int):
        self.registry = registry = CollectorRegistry()
        self.queue_depth = Gauge("moe_queue_depth", "requests waiting for a slot", registry=registry)
        self.running = Gauge("moe_running_requests", "requests holding a slot (prefilling or decoding)",
                             registry=registry)
        Gauge("moe_slots", "cache slots: the most requests decoded together", registry=registry).set(slots)
        self.batch_size = Histogram("moe_batch_size", "rows decoded together per engine step", registry=registry,
                                    buckets=[2 ** i for i in range(11)])
        self.prompt_tokens = Counter("moe_prompt_tokens", "prompt tokens prefilled", registry=registry)
        self.generation_tokens = Counter("moe_generation_tokens", "tokens generated", registry=registry)
        self.tokens_per_second = Gauge("moe_generation_tokens_per_second",
                                       f"tokens generated per second over the last {RATE_WINDOW_S:.0f} s",
                                       registry=registry)
        self.tokens_per_second.set_function(self._rate)
        self.time_to_first_token = Histogram("moe_time_to_first_token_seconds", "from arrival to the first token",
                                             registry=registry, buckets=LATENCY_BUCKETS)
        self.inter_token_latency = Histogram("moe_inter_token_latency_seconds", "between a request's tokens",
                                             registry=registry, buckets=LATENCY_BUCKETS)
        self.request_latency = Histogram("moe_request_latency_seconds", "from arrival to the last token",
                                         registry=registry, buckets=LATENCY_BUCKETS)
        self.requests = Counter("moe_requests", "requests ended, by how: stop, length, cancelled (the client "
                                "left or a stop string matched), error", ["finish"], registry=registry)
        self.rejected = Counter("moe_requests_rejected", "requests answered 429: the queue was full", registry=registry)
        expert_tokens = Counter("moe_expert_tokens", "decoded tokens routed to each expert of each MoE layer "
                                "(layer: the block's index)", ["layer", "expert"], registry=registry)
        self._experts = [[expert_tokens.labels(str(layer), str(e)) for e in range(cfg.n_experts)]
                         for layer in range(cfg.n_layers) if cfg.is_moe_layer(layer)]
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._lock = threading.Lock()

    def step(self, record: StepRecord) -> None:
        if record.batch_size:
            self.batch_size.observe(record.batch_size)
        self.prompt_tokens.inc(record.prefill_tokens)
        self.generation_tokens.inc(len(record.emitted))
        for layer, counts in zip(self._experts, record.tokens_per_expert):
            for child, n in zip(layer, counts):
                if n:
                    child.inc(n)
        now = time.perf_counter()
        with self._lock:
            self._recent.append((now, len(record.emitted)))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def _rate(self) -> float:
        with self._lock:
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def text(self) -> bytes:
        return generate_latest(self.registry)
