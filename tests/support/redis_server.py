"""A real ``redis-server`` for tests: own port, own data dir, AOF on, loopback only, and fault injection.

Usage::

    from tests.support.redis_server import RedisServer

    with RedisServer() as srv:          # starts on a free port in a fresh temp dir
        store = open_store(srv.url)
        srv.kill()                      # kill -9 (acknowledged writes must survive: AOF)
        srv.restart()                   # same port, same dir, replays the AOF
        srv.pause(); srv.resume()       # SIGSTOP / SIGCONT: connects hang, replies never come
        srv.client_pause(2000)          # CLIENT PAUSE 2000 ALL: commands block server-side
        srv.client_unpause()
        srv.stop()                      # graceful shutdown (SIGTERM, AOF flushed)

``RedisServer.available()`` tells whether the binary exists; ``running_redis`` (behind the ``redis_server``
fixtures of ``tests/conftest.py``) skips with a clear reason when it does not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.ports import free_port

NO_REDIS = "redis-server is not installed (apt-get install redis-server); CI installs it"


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1 with its own data directory.

    Args:
        data_dir: where AOF and logs go; a fresh temp dir (removed by ``cleanup``) when None.
        port: TCP port; a free one when None. Kept across ``restart``.
        password: ``requirepass`` for the default user; ``url`` then carries it.
        appendfsync: AOF fsync policy; ``always`` (the setting docs/store.md recommends) makes "no
            acknowledged write lost on kill -9" deterministic.
        extra_args: more ``--name value`` arguments for redis-server.
        binary: the redis-server executable.
        tls_cert: PEM certificate (also used as the CA) to serve TLS only on ``port``; ``url`` is then
            ``rediss://...?ssl_ca_certs=...``.
        tls_key: PEM private key for ``tls_cert``.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        port: int | None = None,
        password: str | None = None,
        appendfsync: str = "always",
        extra_args: tuple[str, ...] = (),
        binary: str = "redis-server",
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ):
        self._own_dir = data_dir is None
        self.dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="lpt-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or 0
        self.password = password
        self.appendfsync = appendfsync
        self.extra_args = tuple(extra_args)
        self.binary = binary
        self.tls_cert = Path(tls_cert) if tls_cert else None
        self.tls_key = Path(tls_key) if tls_key else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._pause_until = 0.0

    @staticmethod
    def available(binary: str = "redis-server") -> bool:
        return shutil.which(binary) is not None

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls_cert:
            return f"rediss://{auth}{self.host}:{self.port}/0?ssl_ca_certs={self.tls_cert}"
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        """A plain redis-py client for the test itself (long timeout; not the store's client)."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            ssl=self.tls_cert is not None,
            ssl_ca_certs=str(self.tls_cert) if self.tls_cert else None,
        )

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING (AOF loaded). Picks a free port on first start."""
        if self.running:
            return self
        for attempt in range(5):
            fixed = self.port != 0
            if not fixed:
                self.port = free_port()
            try:
                self._spawn(timeout)
                return self
            except RuntimeError:
                if fixed or attempt == 4:
                    raise
                self.port = 0  # someone took the port between free_port() and bind: pick another
        return self

    def _spawn(self, timeout: float) -> None:
        if self.tls_cert:
            listen = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.tls_cert),
                "--tls-key-file",
                str(self.tls_key),
                "--tls-ca-cert-file",
                str(self.tls_cert),
                "--tls-auth-clients",
                "no",
            ]
        else:
            listen = ["--port", str(self.port)]
        args = [
            self.binary,
            *listen,
            "--bind", self.host,
            "--protected-mode", "yes",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            "--databases", "16",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"redis-server exited on start (port {self.port}): {err}{self._log_tail()}")
            try:
                with self.client(timeout=0.5) as c:
                    if c.ping():
                        return
            except (redis.BusyLoadingError, redis.ConnectionError, redis.TimeoutError):
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {timeout}s{self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM: Redis flushes the AOF and exits)."""
        if not self.running:
            return
        assert self.proc is not None
        if self._paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._close_proc()

    def kill(self) -> None:
        """``kill -9``: no shutdown work at all; only what reached the AOF survives."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close_proc()

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Start again on the same port and data dir (after ``stop`` or ``kill``; kills a live one first)."""
        if self.running:
            self.kill()
        return self.start(timeout)

    def _close_proc(self) -> None:
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        self._paused = False

    # -- faults -------------------------------------------------------------------------------------
    def pause(self) -> None:
        """SIGSTOP the process: TCP connects still succeed (kernel backlog) but nothing is ever answered."""
        assert self.proc is not None and self.running
        os.kill(self.proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        if self.proc is not None and self._paused:
            os.kill(self.proc.pid, signal.SIGCONT)
        self._paused = False

    def client_pause(self, ms: int, mode: str = "ALL") -> None:
        """``CLIENT PAUSE ms mode``: the server holds every client's commands (``WRITE``: writes only).

        Keep ``ms`` short: Redis before 7.2 holds ``CLIENT UNPAUSE`` itself during an ``ALL`` pause, so
        there the pause ends only when ``ms`` runs out (``client_unpause`` then waits for that).
        """
        with self.client() as c:
            c.execute_command("CLIENT", "PAUSE", int(ms), mode)
        self._pause_until = time.monotonic() + ms / 1000

    def client_unpause(self) -> None:
        """``CLIENT UNPAUSE``; returns once the server answers (at the latest when the pause expires)."""
        left = max(0.0, self._pause_until - time.monotonic())
        with self.client(timeout=left + 5.0) as c:
            c.execute_command("CLIENT", "UNPAUSE")
        self._pause_until = 0.0

    # -- cleanup ------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Kill the process and remove the data dir if this object created it."""
        if self._paused:
            self.resume()
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __del__(self) -> None:
        # Last resort so a crashed test does not leave a server behind.
        with contextlib.suppress(Exception):
            if self.proc is not None and self.proc.poll() is None:
                self.resume()
                self.proc.kill()


def require_redis() -> None:
    """Skip the calling test, saying why, when there is no ``redis-server`` binary."""
    if not RedisServer.available():
        pytest.skip(NO_REDIS)


@contextlib.contextmanager
def running_redis(data_dir: Path, **options: Any) -> Iterator[RedisServer]:
    """A started ``RedisServer`` on ``data_dir`` (skipping the test when there is no binary), killed on exit.

    Args:
        data_dir: its AOF and log directory.
        options: more ``RedisServer`` arguments (``password``, ``tls_cert``, ...).
    """
    require_redis()
    srv = RedisServer(data_dir=data_dir, **options)
    srv.start()
    try:
        yield srv
    finally:
        srv.cleanup()
