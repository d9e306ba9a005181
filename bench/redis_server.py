"""A private ``redis-server`` for the loading benchmark: its own free loopback port and data directory, AOF on.

The benchmark measures cache-miss loads from Redis as the service runs them, so the server is configured as
docs/store.md recommends (``appendonly yes``, ``appendfsync always``) and holds nothing but the benchmark's sets.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import redis

from bench.ports import free_port


def await_ping(proc: subprocess.Popen[bytes], connect: Callable[[], redis.Redis], timeout: float) -> str | None:
    """Wait until the starting ``redis-server`` ``proc`` answers PING (its data loaded): None once it does, else
    why not (its stderr when it exited, or the timeout).

    Args:
        proc: the process, started with ``stderr=PIPE``.
        connect: a new client of it (a short socket timeout: each try must end before the deadline).
        timeout: seconds to wait.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            return f"exited on start: {err}"
        with suppress(redis.BusyLoadingError, redis.ConnectionError, redis.TimeoutError), connect() as client:
            if client.ping():
                return None
        time.sleep(0.02)
    return f"no answer to PING within {timeout}s"


class BenchRedis:
    """One ``redis-server`` process bound to 127.0.0.1, stopped (and its process reaped) by ``stop``.

    Args:
        data_dir: where its AOF and log go (created if absent; left in place).
        binary: the redis-server executable.
    """

    def __init__(self, data_dir: Path, binary: str = "redis-server"):
        self.dir = Path(data_dir)
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available(binary: str = "redis-server") -> bool:
        return shutil.which(binary) is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0, attempts: int = 5) -> BenchRedis:
        """Start on a free port and wait until it answers PING; another port if the chosen one was taken."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            self.port = free_port()
            try:
                self._spawn(timeout)
                return self
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
        return self

    def _spawn(self, timeout: float) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        why = await_ping(self.proc, lambda: redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5), timeout)
        if why is not None:
            self.stop()
            raise RuntimeError(f"redis-server on port {self.port}: {why}")

    def stop(self) -> None:
        """Kill the process (the benchmark keeps nothing in it) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> BenchRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
