"""How the Redis store reaches its data: one server, a primary found through Sentinel, or a Cluster.

``Topology`` gives the store three things whatever the deployment: ``client`` (reads, pipelines and pub/sub,
routed by key in a Cluster), ``node(key)`` (a client of the one primary that holds ``key``, on which a task's
optimistic transaction runs, WATCH to EXEC on one connection) and ``replicas_to_wait`` (how many replicas a write
waits for with ``WAIT`` before it is acknowledged).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from prompts_store.redis_urls import RedisUrl

CLIENT_NAME = "lpt-prompt-store"
# How long the sentinels' view of the replicas is reused before it is asked again.
SENTINEL_VIEW_TTL_S = 1.0
# Errors of a Cluster client that mean "the cluster or its slot map is not usable right now".
CLUSTER_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.RedisClusterException,)


def _tls_kwargs(url: RedisUrl) -> dict[str, Any]:
    """redis-py's TLS keyword arguments from the URL's options (strings converted where redis-py wants a bool)."""
    if not url.tls:
        return {}
    out: dict[str, Any] = {"ssl": True, **url.tls_options}
    if "ssl_check_hostname" in out:
        out["ssl_check_hostname"] = str(out["ssl_check_hostname"]).lower() in ("1", "true", "yes")
    return out


class Topology:
    """The clients of one store URL. A Cluster client is built at first use (building it contacts the seed
    nodes), so opening a store never needs Redis to be up.

    Args:
        url: the parsed store URL.
        timeout_s: socket and connect timeout of every connection.
        health_check_interval: seconds of idleness after which a pooled connection is PINGed before use.
    """

    def __init__(self, url: RedisUrl, timeout_s: float, health_check_interval: int):
        self.url = url
        self.kind = url.topology
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._cluster: RedisCluster | None = None
        self._sentinel: Sentinel | None = None
        self._sentinel_view = (0.0, 0)
        self._stale = False
        common: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "health_check_interval": health_check_interval,
            # One immediate retry, on dropped connections only: a timeout already cost timeout_s.
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            "client_name": CLIENT_NAME,
        }
        self._common = common
        self._server: redis.Redis | None = None
        if url.topology == "server":
            self._server = redis.Redis.from_url(url.server_url, **common)
        elif url.topology == "sentinel":
            auth = {"username": url.username, "password": url.password, "db": url.db}
            self._sentinel = Sentinel(
                list(url.hosts),
                sentinel_kwargs={
                    "socket_timeout": timeout_s,
                    "socket_connect_timeout": timeout_s,
                    "retry": common["retry"],  # redis-py's default backs off for seconds per sentinel
                    "username": url.sentinel_username,
                    "password": url.sentinel_password,
                    **_tls_kwargs(url),
                },
                **common,
                **auth,
                **_tls_kwargs(url),
            )
            assert url.master is not None  # parse_redis_url requires it
            self._server = self._sentinel.master_for(url.master)

    # -- clients ------------------------------------------------------------------------------------
    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The client for single-key commands, non-transactional pipelines and pub/sub."""
        if self._server is not None:
            return self._server
        return self._cluster_client()

    def _cluster_client(self) -> RedisCluster:
        with self._lock:
            if self._cluster is None:
                self._cluster = RedisCluster(
                    startup_nodes=[ClusterNode(host, port) for host, port in self.url.hosts],
                    username=self.url.username,
                    password=self.url.password,
                    **self._common,
                    **_tls_kwargs(self.url),
                )
            return self._cluster

    def node(self, key: str) -> redis.Redis:
        """A client of the primary that holds ``key`` (the only client there is, outside a Cluster)."""
        if self._server is not None:
            return self._server
        cluster = self._cluster_client()
        if self._stale:
            self._stale = False
            cluster.nodes_manager.initialize()
        return cluster.get_redis_connection(cluster.get_node_from_key(key))

    def refresh(self) -> None:
        """Note that a Cluster's slot map may be out of date (MOVED, ASK, a lost node): the next ``node`` reads it
        again, so a failing call is not slowed down by it. Nothing to do outside a Cluster."""
        self._stale = self._cluster is not None

    # -- replication --------------------------------------------------------------------------------
    def replicas_to_wait(self, role: list[Any] | None) -> int:
        """How many replicas a write on a primary waits for: at least ``min_replicas``, and every replica known
        to be up: the sentinels' view for a Sentinel deployment (so a replica that is being promoted still
        counts, and a write on a primary cut off from it is never acknowledged), else the primary's own
        ``ROLE`` (its connected replicas).

        Args:
            role: the reply of ``ROLE`` on the session's primary (unused with Sentinel).
        """
        if self._sentinel is not None:
            known = self._sentinel_replicas()
        elif role and role[0] in (b"master", "master"):
            known = len(role[2])
        else:
            known = 0
        return max(self.url.min_replicas, known)

    @property
    def asks_role(self) -> bool:
        """Whether ``replicas_to_wait`` needs the primary's ``ROLE`` (everywhere but with Sentinel)."""
        return self._sentinel is None

    def _sentinel_replicas(self) -> int:
        """Replicas of the master that the sentinels see up and in sync (``master-link-status`` ok), cached."""
        checked, count = self._sentinel_view
        if time.monotonic() - checked < SENTINEL_VIEW_TTL_S:
            return count
        assert self._sentinel is not None and self.url.master is not None
        for sentinel in self._sentinel.sentinels:
            try:
                replicas = sentinel.sentinel_slaves(self.url.master)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                continue
            count = sum(1 for r in replicas if _replica_up(r))
            self._sentinel_view = (time.monotonic(), count)
            return count
        raise redis.ConnectionError(f"no sentinel answered for master {self.url.master!r}")

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._cluster is not None:
            self._cluster.close()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                sentinel.close()


def _replica_up(replica: dict[str, Any]) -> bool:
    down = replica.get("is_sdown") or replica.get("is_odown") or replica.get("is_disconnected")
    return not down and replica.get("master-link-status") == "ok"
