"""A server as a child process on 127.0.0.1, for tests and `bench.py serve`: started on a free
port (read back from its log), waited for within a deadline, always stopped by its pid."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

LISTENING = re.compile(r"moe.serve: listening on http://127\.0\.0\.1:(\d+)")


class ServerProcess:
    """`with ServerProcess(["--checkpoint", run]) as server: server.url` ... stopped on leaving."""

    def __init__(self, args: list[str], start_timeout_s: float = 120.0, env: dict | None = None):
        self.args, self.start_timeout_s, self.env = args, start_timeout_s, env
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._log = tempfile.NamedTemporaryFile("w+", prefix="moe-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "moe.serve", *self.args, "--host", "127.0.0.1",
                                      "--port", "0"], stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + self.start_timeout_s
        while not self._healthy():
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server was not serving within {self.start_timeout_s:.0f} s:\n{self.log()}")
            time.sleep(0.1)
        return self

    def _healthy(self) -> bool:
        if self.port is None:
            found = LISTENING.search(self.log())
            self.port = int(found.group(1)) if found else None
            return False
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status == 200
        except OSError:  # not accepting yet (URLError is one)
            return False

    def __exit__(self, *exc) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)

    def log(self) -> str:
        return Path(self._log.name).read_text()

    def get(self, path: str, timeout_s: float = 10.0) -> str:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout_s) as response:
                return response.read().decode()
        except urllib.error.HTTPError as e:
            return e.read().decode()

    def metric(self, name: str) -> float:
        """One unlabelled metric's value from /metrics."""
        found = re.search(rf"^{name} (\S+)$", self.get("/metrics"), re.MULTILINE)
        if found is None:
            raise KeyError(f"{name} is not in /metrics")
        return float(found.group(1))

    def terminate(self) -> None:
        """SIGTERM: the server drains (finishes what is in flight) and exits."""
        os.kill(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within the timeout."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout_s)
