"""The engine in its own thread, stepping for as long as there is work; the server's requests
join and leave between its steps, and their tokens flow back to the server's event loop.

The engine itself stays single-threaded: other threads only post commands (submit, cancel) to
a queue the engine thread reads before each step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from ..infer.engine import Emitted, Engine, Request
from .metrics import ServerMetrics

log = logging.getLogger("moe.serve")


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"the server's queue is full ({waiting} requests waiting); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineFailed(Exception):
    """The engine raised while this request was in it (the server carries on with the others)."""


@dataclass
class Ticket:
    """A request in the engine, as its handler sees it: its tokens arrive on `events`."""

    id: int
    events: asyncio.Queue  # Emitted, or EngineFailed
    loop: asyncio.AbstractEventLoop
    arrived_s: float
    last_token_s: float | None = None
    done: bool = False

    def post(self, item: Emitted | EngineFailed) -> None:  # from the engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass
class EngineLoop:
    engine: Engine
    max_queue: int
    metrics: ServerMetrics
    _tickets: dict[int, Ticket] = field(default_factory=dict)
    _commands: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: itertools.count = field(default_factory=itertools.count)
    _served_s: float = 1.0  # a recent request's time in the engine, for Retry-After

    def __post_init__(self):
        self._thread = threading.Thread(target=self._run, name="moe-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish everything accepted, then end the thread."""
        self._stopping.set()
        self._wake.set()
        self._thread.join()

    @property
    def accepted(self) -> int:
        """Requests submitted and not yet ended."""
        return len(self._tickets)

    def submit(self, request: Request) -> Ticket:
        """Queue a request (its id is assigned here); QueueFull when max_queue already wait."""
        with self._lock:
            waiting = self.accepted - len(self.engine.running)
            if waiting >= self.max_queue:
                self.metrics.rejected.inc()
                retry = math.ceil(self._served_s * (waiting + 1) / self.engine.slots)
                raise QueueFull(waiting, max(1, retry))
            request.id = next(self._ids)
            ticket = Ticket(request.id, asyncio.Queue(), asyncio.get_running_loop(), time.perf_counter())
            self._tickets[request.id] = ticket
        self._commands.put(("submit", request))
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The request is no longer wanted (its client left, or a stop string ended it): its slot
        is freed before the next step."""
        if not ticket.done:
            self._commands.put(("cancel", ticket.id))
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._apply_commands()
            if not (self.engine.queue or self.engine.running):
                if self._stopping.is_set() and self._commands.empty():
                    return
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                record = self.engine.step()
            except Exception as e:
                log.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
                continue
            self.metrics.step(record)
            now = time.perf_counter()
            for emitted in record.emitted:
                self._deliver(emitted, now)
            self._update_gauges()

    def _apply_commands(self) -> None:
        while not self._commands.empty():
            kind, payload = self._commands.get()
            if kind == "submit":
                self.engine.submit(payload)
            elif self.engine.cancel(payload):
                self._end(self._tickets[payload], "cancelled")
        self._update_gauges()

    def _deliver(self, emitted: Emitted, now: float) -> None:
        ticket = self._tickets[emitted.id]
        if ticket.last_token_s is None:
            self.metrics.time_to_first_token.observe(now - ticket.arrived_s)
        else:
            self.metrics.inter_token_latency.observe(now - ticket.last_token_s)
        ticket.last_token_s = now
        ticket.post(emitted)
        if emitted.finish:
            self.metrics.request_latency.observe(now - ticket.arrived_s)
            self._served_s = 0.8 * self._served_s + 0.2 * (now - ticket.arrived_s)
            self._end(ticket, emitted.finish)

    def _end(self, ticket: Ticket, finish: str) -> None:
        ticket.done = True
        self.metrics.requests.labels(finish).inc()
        with self._lock:
            del self._tickets[ticket.id]

    def _fail_all(self, message: str) -> None:
        for ticket in list(self._tickets.values()):
            self.engine.cancel(ticket.id)
            ticket.post(EngineFailed(message))
            self._end(ticket, "error")

    def _update_gauges(self) -> None:
        running = len(self.engine.running)
        self.metrics.running.set(running)
        self.metrics.queue_depth.set(self.accepted - running)
