"""Redis backend: optimistic transactions (WATCH/MULTI/EXEC, no Lua), pub/sub plus reconciliation.

Keys (``p`` is the prefix, ``lpt:`` by default; ids never contain ``:`` or ``/``, see ``lpt.ids``)::

    {p}tenants                       SET    tenants that have at least one task
    {p}tasks:{tenant}                SET    task ids of a tenant
    {p}task:{tenant}:{task}          HASH   active -> N;  v:N -> JSON {sha256, size, created, meta}
    {p}blob:{tenant}:{task}:{sha256} STRING the bytes (content-addressed inside the task)
    {p}blobs:{tenant}:{task}         SET    sha256 of every blob key above, so delete finds them all
    {p}seq:{tenant}:{task}           STRING last version number issued; kept on delete so numbers never repeat
    {p}upload:{tenant}:{task}:{sha256}:{uuid}  STRING a blob being uploaded (expires after an hour)
    {p}active                        HASH   "{tenant}/{task}" -> N for every task: snapshot() is one HGETALL
    channel {p}changes               JSON {tenant, task, active} published inside the same MULTI as the write

A version becomes visible only through the MULTI that writes its ``v:N`` field and the active pointers, so
readers never see a partial version. The blob is written before that MULTI (so contention retries do not
resend megabytes), in 1 MiB chunks to an expiring ``{p}upload:...`` key that is then renamed; a blob without a
version is harmless and is removed with its task.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lpt.errors import InvalidTaskId, NotFound, StoreUnavailable
from lpt.ids import check_task_id, check_tenant_id
from prompts_store._common import (
    Snapshot,
    Watcher,
    check_ids,
    check_put,
    check_version,
    decode_info,
    encode_info,
    log,
    sha256_hex,
    verify_blob,
)
from prompts_store.base import DEFAULT_MAX_BYTES, ChangeEvent, StoredBlob, StoredVersion, VersionConflict

# Optimistic transactions retry on conflict; this bounds a put under pathological contention.
_MAX_ATTEMPTS = 500
# Blob upload chunk: small enough to cross a slow link within one socket timeout.
_CHUNK = 1 << 20
_UPLOAD_TTL_S = 3600


def redact_url(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class RedisPromptStore:
    """Prompt store on Redis (or Valkey). Thread-safe: redis-py pools connections.

    Every Redis failure (refused, timeout, paused, auth, loading, response error) surfaces as
    ``StoreUnavailable`` after at most about ``timeout_s``: socket and connect timeouts are ``timeout_s``,
    timeouts are never retried, and a dropped connection is retried once, immediately (a pooled connection
    is stale after a Redis restart). A ``put`` that raises ``StoreUnavailable`` may or may not have been
    applied; retrying it with the same bytes is safe (an equal active version is returned).

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` for TLS (query parameters such
            as ``ssl_ca_certs`` or ``ssl_cert_reqs`` are passed to redis-py), or ``unix:///path?db=N``.
        max_bytes: largest blob ``put`` accepts.
        timeout_s: socket and connect timeout in seconds.
        prefix: key prefix, to share a Redis database with other data.
        health_check_interval: seconds of idleness after which a pooled connection is PINGed before use.
    """

    def __init__(
        self,
        url: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = 0.5,
        prefix: str = "lpt:",
        health_check_interval: int = 10,
    ):
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.prefix = prefix
        self.url = redact_url(url)
        self.channel = f"{prefix}changes"
        self._active_key = f"{prefix}active"
        self._r = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=health_check_interval,
            # One immediate retry, on dropped connections only: a timeout already cost timeout_s.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            client_name="lpt-prompt-store",
        )

    def __repr__(self) -> str:
        return f"RedisPromptStore({self.url!r})"

    # -- keys ---------------------------------------------------------------------------------------
    def _task_key(self, tenant: str, task: str) -> str:
        return f"{self.prefix}task:{tenant}:{task}"

    def _blob_key(self, tenant: str, task: str, sha: str) -> str:
        return f"{self.prefix}blob:{tenant}:{task}:{sha}"

    def _blobs_key(self, tenant: str, task: str) -> str:
        return f"{self.prefix}blobs:{tenant}:{task}"

    def _seq_key(self, tenant: str, task: str) -> str:
        return f"{self.prefix}seq:{tenant}:{task}"

    def _tasks_key(self, tenant: str) -> str:
        return f"{self.prefix}tasks:{tenant}"

    @contextmanager
    def _unavailable(self, what: str) -> Iterator[None]:
        try:
            yield
        except (redis.RedisError, OSError) as e:
            raise StoreUnavailable(
                "store_unavailable", f"redis {what} failed ({self.url}): {type(e).__name__}: {e}"
            ) from e

    def _publish(self, pipe: redis.client.Pipeline, tenant: str, task: str, active: int | None) -> None:
        pipe.publish(self.channel, json.dumps({"tenant": tenant, "task": task, "active": active}))

    @staticmethod
    def _backoff(attempt: int) -> None:
        # Jitter spreads contending writers out so one of them wins each round.
        time.sleep(random.uniform(0, min(0.02, 0.001 * (1 << min(attempt, 5)))))

    # -- writes -------------------------------------------------------------------------------------
    def _upload_blob(self, tenant: str, task: str, sha: str, data: bytes) -> None:
        """Write the blob under a temporary key in chunks, then move it in place and register it in one MULTI.

        Chunks because the socket timeout bounds each ``sendall`` as a whole: 64 MiB in one command would need
        more than a short timeout on a real network. The temporary key expires, so an upload cut off by a crash
        cleans itself up; nothing references a blob until the version transaction commits.
        """
        tmp = f"{self.prefix}upload:{tenant}:{task}:{sha}:{uuid.uuid4().hex}"
        view = memoryview(data)
        try:
            for off in range(0, max(len(data), 1), _CHUNK):
                with self._r.pipeline(transaction=False) as p:
                    p.append(tmp, view[off : off + _CHUNK])
                    p.expire(tmp, _UPLOAD_TTL_S)
                    p.execute()
            with self._r.pipeline(transaction=True) as p:
                p.sadd(self._blobs_key(tenant, task), sha)
                p.rename(tmp, self._blob_key(tenant, task, sha))
                p.persist(self._blob_key(tenant, task, sha))
                p.execute()
        except redis.RedisError:
            with suppress(redis.RedisError):
                self._r.delete(tmp)
            raise

    def put(self, tenant: str, task: str, data: bytes, meta: dict[str, str] | None = None) -> StoredVersion:
        """Store ``data`` as a new version and activate it; bytes equal to the active version return it.

        Args:
            tenant: owner namespace.
            task: task id.
            data: the (already validated) prompt-set bytes.
            meta: small str -> str metadata returned with the version.
        """
        check_ids(tenant, task)
        meta = check_put(data, meta, self.max_bytes)
        data = bytes(data)
        sha = sha256_hex(data)
        tk, sk = self._task_key(tenant, task), self._seq_key(tenant, task)
        with self._unavailable("put"):
            for attempt in range(_MAX_ATTEMPTS):
                with self._r.pipeline(transaction=True) as p:
                    try:
                        p.watch(tk, sk)
                        active = p.hget(tk, "active")
                        if active is not None:
                            raw = p.hget(tk, f"v:{int(active)}")
                            if raw is not None:
                                info = decode_info(tenant, task, int(active), raw)
                                if info.sha256 == sha:
                                    return info
                        if not p.exists(self._blob_key(tenant, task, sha)):
                            p.unwatch()
                            self._upload_blob(tenant, task, sha, data)
                            continue
                        version = int(p.get(sk) or 0) + 1
                        info = StoredVersion(tenant, task, version, sha, len(data), time.time(), meta, new=True)
                        p.multi()
                        p.set(sk, version)
                        encoded = encode_info(sha, len(data), info.created, meta)
                        p.hset(tk, mapping={"active": version, f"v:{version}": encoded})
                        p.hset(self._active_key, f"{tenant}/{task}", version)
                        p.sadd(self._tasks_key(tenant), task)
                        p.sadd(f"{self.prefix}tenants", tenant)
                        self._publish(p, tenant, task, version)
                        p.execute()
                        return info
                    except redis.WatchError:
                        self._backoff(attempt)
        raise StoreUnavailable("store_contention", f"put of {tenant}/{task} lost {_MAX_ATTEMPTS} optimistic retries")

    def activate(self, tenant: str, task: str, version: int) -> StoredVersion:
        """Make an existing version active (rollback or roll forward)."""
        check_ids(tenant, task)
        check_version(version)
        tk = self._task_key(tenant, task)
        with self._unavailable("activate"):
            for attempt in range(_MAX_ATTEMPTS):
                with self._r.pipeline(transaction=True) as p:
                    try:
                        p.watch(tk)
                        active, raw = p.hmget(tk, ["active", f"v:{version}"])
                        if raw is None:
                            raise NotFound("not_found", f"task {task!r} has no version {version}", "version")
                        info = decode_info(tenant, task, version, raw)
                        if active is not None and int(active) == version:
                            return info
                        p.multi()
                        p.hset(tk, "active", version)
                        p.hset(self._active_key, f"{tenant}/{task}", version)
                        self._publish(p, tenant, task, version)
                        p.execute()
                        return info
                    except redis.WatchError:
                        self._backoff(attempt)
        raise StoreUnavailable("store_contention", f"activate of {tenant}/{task} lost {_MAX_ATTEMPTS} retries")

    def delete(self, tenant: str, task: str) -> None:
        """Delete a task, all its versions and blobs. Its version numbers are not reused."""
        check_ids(tenant, task)
        tk, bk, tasks_key = self._task_key(tenant, task), self._blobs_key(tenant, task), self._tasks_key(tenant)
        executed = False
        with self._unavailable("delete"):
            for attempt in range(_MAX_ATTEMPTS):
                with self._r.pipeline(transaction=True) as p:
                    try:
                        p.watch(tk, bk, tasks_key)
                        if not p.exists(tk):
                            if executed:  # our EXEC ran but its reply was lost; the task is gone either way
                                return
                            raise NotFound("not_found", f"task {task!r} does not exist", "task")
                        shas = [s.decode() for s in p.smembers(bk)]
                        others = p.scard(tasks_key) - (1 if p.sismember(tasks_key, task) else 0)
                        p.multi()
                        p.delete(tk, bk, *(self._blob_key(tenant, task, s) for s in shas))
                        p.hdel(self._active_key, f"{tenant}/{task}")
                        p.srem(tasks_key, task)
                        if others == 0:
                            p.srem(f"{self.prefix}tenants", tenant)
                        self._publish(p, tenant, task, None)
                        executed = True
                        p.execute()
                        return
                    except redis.WatchError:
                        self._backoff(attempt)
        raise StoreUnavailable("store_contention", f"delete of {tenant}/{task} lost {_MAX_ATTEMPTS} retries")

    def restore_version(
        self, tenant: str, task: str, version: int, data: bytes, created: float, meta: dict[str, str] | None = None
    ) -> StoredVersion:
        """Write a version with a given number (backup import). See ``base.SupportsRestore``."""
        check_ids(tenant, task)
        check_version(version)
        meta = check_put(data, meta, self.max_bytes)
        data = bytes(data)
        sha = sha256_hex(data)
        tk, sk = self._task_key(tenant, task), self._seq_key(tenant, task)
        with self._unavailable("restore"):
            for attempt in range(_MAX_ATTEMPTS):
                with self._r.pipeline(transaction=True) as p:
                    try:
                        p.watch(tk, sk)
                        active, raw = p.hmget(tk, ["active", f"v:{version}"])
                        if raw is not None:
                            info = decode_info(tenant, task, version, raw)
                            if info.sha256 != sha:
                                raise VersionConflict(
                                    "version_conflict", f"{tenant}/{task} v{version} exists with other bytes", "version"
                                )
                            return info
                        if not p.exists(self._blob_key(tenant, task, sha)):
                            p.unwatch()
                            self._upload_blob(tenant, task, sha, data)
                            continue
                        seq = int(p.get(sk) or 0)
                        p.multi()
                        p.set(sk, max(seq, version))
                        p.hset(tk, f"v:{version}", encode_info(sha, len(data), created, meta))
                        if active is None:  # a new task needs an active pointer; the importer sets the real one
                            p.hset(tk, "active", version)
                            p.hset(self._active_key, f"{tenant}/{task}", version)
                            p.sadd(self._tasks_key(tenant), task)
                            p.sadd(f"{self.prefix}tenants", tenant)
                            self._publish(p, tenant, task, version)
                        p.execute()
                        return StoredVersion(tenant, task, version, sha, len(data), created, meta)
                    except redis.WatchError:
                        self._backoff(attempt)
        raise StoreUnavailable("store_contention", f"restore of {tenant}/{task} lost {_MAX_ATTEMPTS} retries")

    # -- reads --------------------------------------------------------------------------------------
    def _info(self, tenant: str, task: str, version: int | None) -> StoredVersion:
        tk = self._task_key(tenant, task)
        if version is None:
            active = self._r.hget(tk, "active")
            if active is None:
                raise NotFound("not_found", f"task {task!r} does not exist", "task")
            version = int(active)
        raw = self._r.hget(tk, f"v:{version}")
        if raw is None:
            raise NotFound("not_found", f"task {task!r} has no version {version}", "version")
        return decode_info(tenant, task, version, raw)

    def get(self, tenant: str, task: str, version: int | None = None) -> StoredBlob:
        """The active version (or the given one), checksum-verified bytes and metadata."""
        check_ids(tenant, task)
        if version is not None:
            check_version(version)
        with self._unavailable("get"):
            info = self._info(tenant, task, version)
            data = self._r.get(self._blob_key(tenant, task, info.sha256))
        if data is None:  # deleted between the two reads
            raise NotFound("not_found", f"task {task!r} version {info.version} was deleted", "task")
        verify_blob(info, data)
        return StoredBlob(info, data)

    def active_version(self, tenant: str, task: str) -> StoredVersion:
        check_ids(tenant, task)
        with self._unavailable("active_version"):
            return self._info(tenant, task, None)

    def list_tasks(self, tenant: str) -> list[str]:
        check_tenant_id(tenant)
        with self._unavailable("list_tasks"):
            return sorted(t.decode() for t in self._r.smembers(self._tasks_key(tenant)))

    def list_tenants(self) -> list[str]:
        with self._unavailable("list_tenants"):
            return sorted(t.decode() for t in self._r.smembers(f"{self.prefix}tenants"))

    def list_versions(self, tenant: str, task: str) -> list[StoredVersion]:
        check_ids(tenant, task)
        with self._unavailable("list_versions"):
            fields = self._r.hgetall(self._task_key(tenant, task))
        if not fields:
            raise NotFound("not_found", f"task {task!r} does not exist", "task")
        out = [decode_info(tenant, task, int(k[2:]), v) for k, v in fields.items() if k.startswith(b"v:")]
        return sorted(out, key=lambda i: i.version)

    def snapshot(self) -> Snapshot:
        with self._unavailable("snapshot"):
            raw = self._r.hgetall(self._active_key)
        out: Snapshot = {}
        for k, v in raw.items():
            tenant, _, task = k.decode().partition("/")
            out[(tenant, task)] = int(v)
        return out

    def ping(self) -> None:
        with self._unavailable("ping"):
            self._r.ping()

    # -- notifications ------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[ChangeEvent], None], reconcile_s: float = 2.0) -> _RedisWatcher:
        """Deliver changes from pub/sub as they happen and from a snapshot diff every ``reconcile_s``.

        Never raises for an unreachable Redis: the watcher thread retries (backoff up to 1 s) and diffs a
        fresh snapshot as soon as it is back, so changes made during an outage arrive then.
        """
        watcher = _RedisWatcher(self, callback, reconcile_s)
        try:
            baseline: Snapshot | None = self.snapshot()
        except StoreUnavailable as e:
            log.warning("prompt store unreachable at subscribe; the first snapshot will be delivered in full: %s", e)
            baseline = None
        watcher.start(baseline)
        return watcher

    def close(self) -> None:
        self._r.close()


class _RedisWatcher(Watcher):
    def __init__(self, store: RedisPromptStore, callback: Callable[[ChangeEvent], None], reconcile_s: float):
        super().__init__(callback, reconcile_s, name="lpt-store-watch-redis")
        self._store = store
        self._pubsub: redis.client.PubSub | None = None

    def _wait(self, timeout: float) -> tuple[list[ChangeEvent], bool]:
        due = False
        if self._pubsub is None:
            ps = self._store._r.pubsub(ignore_subscribe_messages=True)
            self._pubsub = ps
            ps.subscribe(self._store.channel)
            due = True  # messages published while we were not subscribed are lost: diff a snapshot now
        events: list[ChangeEvent] = []
        msg = self._pubsub.get_message(timeout=timeout)
        while msg is not None and len(events) < 10_000:
            ev = _parse_message(msg)
            if ev is not None:
                events.append(ev)
            msg = self._pubsub.get_message(timeout=0)
        return events, due

    def _snapshot(self) -> Snapshot:
        return self._store.snapshot()

    def _reset(self) -> None:
        ps, self._pubsub = self._pubsub, None
        if ps is not None:
            # Closing a broken connection may fail; it is discarded either way.
            with suppress(Exception):
                ps.close()


def _parse_message(msg: dict) -> ChangeEvent | None:
    """A change message, or None for anything malformed (anyone with access can publish on the channel)."""
    if msg.get("type") != "message":
        return None
    try:
        d = json.loads(msg["data"])
        active = d["active"]
        if active is not None and (isinstance(active, bool) or not isinstance(active, int)):
            return None
        return ChangeEvent(check_tenant_id(d["tenant"]), check_task_id(d["task"]), active)
    except (ValueError, KeyError, TypeError, InvalidTaskId):
        log.warning("ignoring malformed prompt store change message: %r", msg.get("data"))
        return None
