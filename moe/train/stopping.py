"""Stopping the way long runs should: the first SIGINT (Ctrl-C) or SIGTERM lets the current step
finish and a checkpoint be written; a second one stops at once, as if this were not here."""

from __future__ import annotations

import signal


class StopSignals:
    """`with StopSignals() as stop:` ... `stop.received` is the first signal that came, or None."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        try:
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread, the only one where handlers can be set (Python says which)
            self.previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
            return
        previous = self.previous.get(signum, signal.SIG_DFL)
        self.__exit__()  # a second signal: the handlers from before, and this signal handled by them
        if callable(previous):  # Python's own raises KeyboardInterrupt here, in this frame
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # the default action: terminate
            signal.raise_signal(signum)
