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

The topologies production runs, each on loopback ports: ``make_tls_files`` (a CA, a server and a client
certificate made with openssl) for ``RedisServer(tls=...)``; ``SentinelGroup`` (a primary, its replicas and three
sentinels: ``url`` is the store's ``redis+sentinel://`` URL, ``failover()`` and ``kill_primary()`` switch the
primary); ``ClusterGroup`` (three primaries joined by ``redis-cli --cluster create``; ``url`` is ``redis+cluster://``).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest
import redis

from bench.redis_server import await_ping
from tests.support.ports import free_port

NO_REDIS = "redis-server is not installed (apt-get install redis-server); CI installs it"
NO_OPENSSL = "the openssl CLI is not installed (apt-get install openssl); CI installs it"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A fresh CA and the certificates it signs (P-256 keys, valid one day), made with the openssl CLI.

    Args:
        directory: where the files go (created).
    """
    if shutil.which("openssl") is None:
        pytest.skip(NO_OPENSSL)
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(*(directory / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    ca_key = directory / "ca.key"
    key_args = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *key_args, "-days", "1", "-subj", "/CN=lpt test CA", "-keyout", ca_key, "-out", files.ca)
    for name, cert, key, ext in (
        ("127.0.0.1", files.cert, files.key, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("lpt-client", files.client_cert, files.client_key, "extendedKeyUsage=clientAuth"),
    ):
        csr, extfile = directory / f"{cert.stem}.csr", directory / f"{cert.stem}.ext"
        extfile.write_text(ext + "\n")
        _openssl("req", "-new", *key_args, "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
        _openssl(
            "x509", "-req", "-in", csr, "-CA", files.ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
            "-extfile", extfile, "-out", cert,
        )  # fmt: skip
    return files


def _openssl(*args: object) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr}")


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
        tls: certificates from ``make_tls_files`` instead of ``tls_cert``/``tls_key``: TLS only, clients may
            present a certificate signed by the CA (``tls-auth-clients optional``).
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
        tls: TlsFiles | None = None,
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
        self.tls_cert = tls.cert if tls else Path(tls_cert) if tls_cert else None
        self.tls_key = tls.key if tls else Path(tls_key) if tls_key else None
        self.tls_ca = tls.ca if tls else self.tls_cert
        self.tls_auth_clients = "optional" if tls else "no"
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
            return f"rediss://{auth}{self.host}:{self.port}/0?ssl_ca_certs={self.tls_ca}"
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
            ssl_ca_certs=str(self.tls_ca) if self.tls_ca else None,
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
                str(self.tls_ca),
                "--tls-auth-clients",
                self.tls_auth_clients,
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
        why = await_ping(self.proc, lambda: self.client(timeout=0.5), timeout)
        if why is not None:
            self.kill()
            raise RuntimeError(f"redis-server on port {self.port}: {why}{self._log_tail()}")

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


def sentinel_command(config: Path) -> list[str]:
    """How to start a sentinel on ``config``: Debian's ``redis-sentinel``, else ``redis-server --sentinel``."""
    if shutil.which("redis-sentinel"):
        return ["redis-sentinel", str(config)]
    return ["redis-server", str(config), "--sentinel"]


class _Group:
    """A context manager over ``start`` and ``cleanup``: cleaned up also when starting fails half way."""

    def start(self) -> Self:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class SentinelGroup(_Group):
    """A Sentinel deployment on loopback: one primary, ``replicas`` replicas and ``sentinels`` sentinels.

    Sentinels decide fast (``down_after_ms``), so a killed primary is replaced within a few seconds. The servers
    keep AOF with ``appendfsync always``, like production.

    Args:
        root: a directory for every process's data, configuration and log.
        master: the name the sentinels monitor.
        replicas: replicas of the primary.
        sentinels: sentinel processes (quorum: a majority of them).
        down_after_ms: how long a server may not answer before a sentinel considers it down.
    """

    def __init__(
        self, root: Path, master: str = "lpt", replicas: int = 1, sentinels: int = 3, down_after_ms: int = 400
    ):
        self.root = root
        self.master = master
        self.down_after_ms = down_after_ms
        self.servers: dict[int, RedisServer] = {}
        self.sentinel_ports: list[int] = []
        self._sentinels: list[subprocess.Popen[bytes]] = []
        self._counts = (replicas, sentinels)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.master}"

    def start(self) -> SentinelGroup:
        require_redis()
        replicas, sentinels = self._counts
        # Diskless sync waits 5 s by default for more replicas to join one transfer: not here.
        fast_sync = ("--repl-diskless-sync-delay", "0")
        primary = RedisServer(self.root / "server-0", extra_args=fast_sync).start()
        self.servers[primary.port] = primary
        for i in range(1, replicas + 1):
            args = (*fast_sync, "--replicaof", "127.0.0.1", str(primary.port))
            replica = RedisServer(self.root / f"server-{i}", extra_args=args).start()
            self.servers[replica.port] = replica
        self._wait(lambda: self._in_sync(primary) == replicas, 10, "the replicas to sync")
        quorum = sentinels // 2 + 1
        # Failover needs every sentinel to know the replicas and the other sentinels; their configuration
        # names them all (with fixed ids) instead of leaving it to hello messages, which take seconds.
        ids = [os.urandom(20).hex() for _ in range(sentinels)]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        for i, port in enumerate(self.sentinel_ports):
            config = self.root / f"sentinel-{i}.conf"
            lines = [
                f"port {port}", "bind 127.0.0.1", f"dir {self.root}", f"logfile {self.root / f'sentinel-{i}.log'}",
                f"sentinel myid {ids[i]}",
                f"sentinel monitor {self.master} 127.0.0.1 {primary.port} {quorum}",
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master} 4000",
                *(f"sentinel known-replica {self.master} 127.0.0.1 {p}" for p in self.servers if p != primary.port),
                *(
                    f"sentinel known-sentinel {self.master} 127.0.0.1 {other} {ids[j]}"
                    for j, other in enumerate(self.sentinel_ports)
                    if j != i
                ),
            ]  # fmt: skip
            config.write_text("\n".join(lines) + "\n")
            self._sentinels.append(subprocess.Popen(sentinel_command(config), stdout=subprocess.DEVNULL))
        self._wait(self._sentinels_agree, 20, "the sentinels to know each other and the replicas")
        return self

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[i], socket_timeout=2, socket_connect_timeout=2)

    def primary_port(self) -> int:
        """The primary's port as the first sentinel that answers says."""
        for i in range(len(self.sentinel_ports)):
            with contextlib.suppress(redis.RedisError), self.sentinel(i) as s:
                return int(s.sentinel_get_master_addr_by_name(self.master)[1])
        raise RuntimeError("no sentinel answered")

    @property
    def primary(self) -> RedisServer:
        return self.servers[self.primary_port()]

    def failover(self, timeout: float = 20.0) -> int:
        """``SENTINEL FAILOVER``: promote a replica; returns the new primary's port once it accepts writes."""
        old = self.primary_port()
        with self.sentinel() as s:
            s.execute_command("SENTINEL", "FAILOVER", self.master)
        return self.wait_new_primary(old, timeout)

    def kill_primary(self) -> int:
        """``kill -9`` of the primary; returns its port (``wait_new_primary`` waits for the sentinels)."""
        old = self.primary_port()
        self.servers[old].kill()
        return old

    def wait_new_primary(self, old: int, timeout: float = 20.0) -> int:
        """The port of the primary that replaced ``old``, once the sentinels agree on it and it answers as one."""

        def switched() -> bool:
            port = self.primary_port()
            if port == old:
                return False
            with self.servers[port].client(timeout=1) as c:
                return c.execute_command("ROLE")[0] in (b"master", "master")

        self._wait(switched, timeout, f"a new primary in place of :{old}")
        return self.primary_port()

    def _in_sync(self, primary: RedisServer) -> int:
        with primary.client(timeout=1) as c:
            info = c.info("replication")
        return sum(
            1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict) and v["state"] == "online"
        )

    def _sentinels_agree(self) -> bool:
        replicas, sentinels = self._counts
        for i in range(sentinels):
            with self.sentinel(i) as s:
                if (
                    len(s.sentinel_slaves(self.master)) < replicas
                    or len(s.sentinel_sentinels(self.master)) < sentinels - 1
                ):
                    return False
        return True

    @staticmethod
    def _wait(condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, OSError, KeyError):
                if condition():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}")

    def cleanup(self) -> None:
        for proc in self._sentinels:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for server in self.servers.values():
            server.cleanup()


class ClusterGroup(_Group):
    """A Redis Cluster of ``primaries`` primaries (no replicas) on loopback, joined by ``redis-cli --cluster create``.

    Args:
        root: a directory for every node's data, configuration and log.
        primaries: nodes; each gets a third of the slots with three.
        password: ``requirepass`` of every node (the default user), given to ``redis-cli`` through REDISCLI_AUTH.
    """

    def __init__(self, root: Path, primaries: int = 3, password: str | None = None):
        self.root = root
        self.password = password
        self.nodes: list[RedisServer] = []
        self._count = primaries

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return "redis+cluster://" + auth + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> ClusterGroup:
        require_redis()
        if shutil.which("redis-cli") is None:
            pytest.skip("redis-cli is not installed (apt-get install redis-tools); CI installs it")
        for i in range(self._count):
            node_dir = self.root / f"node-{i}"
            args = ("--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"))
            self.nodes.append(RedisServer(node_dir, password=self.password, extra_args=args).start())
        env = {**os.environ, "REDISCLI_AUTH": self.password} if self.password else None
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
        done = subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60, env=env
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
        SentinelGroup._wait(self._ok, 20, "every node to report cluster_state:ok")
        return self

    def _ok(self) -> bool:
        for node in self.nodes:
            with node.client(timeout=1) as c:
                if c.cluster("info")["cluster_state"] != "ok":
                    return False
        return True

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()
