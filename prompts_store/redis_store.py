"""Redis backend: optimistic transactions (WATCH/MULTI/EXEC, no Lua), pub/sub plus reconciliation.

Keys (``p`` is the prefix, ``lpt:`` by default; ids never contain ``:`` or ``/``, see ``lpt.ids``)::

    {p}tenants                       SET    tenants that have at least one task
    {p}tasks:{tenant}                SET    task ids of a tenant
    {p}task:{tenant}:{task}          HASH   active -> N;  v:N -> JSON {sha256, size, created, meta}
    {p}blob:{tenant}:{task}:{sha256} STRING the bytes (content-addressed inside the task)
    {p}blobs:{tenant}:{task}         SET    sha256 of every blob key above, so delete finds them all
    {p}seq:{tenant}:{task}           STRING last version number issued; kept on delete so numbers never repeat
    {p}upload:{tenant}:{task}:{sha256}:{uuid}  STRING a blob being uploaded (expires after an hour)
    {p}active                        HASH   "{tenant}/{task}" -> JSON {revision, active, sha256}: every task's
                                            state, tombstones (active and sha256 null) included; state() is one
                                            HGET, snapshot() one HGETALL
    channel {p}changes               JSON {tenant, task, revision, active, sha256} published inside the same MULTI
                                     as the write

A version becomes visible only through the MULTI that writes its ``v:N`` field, the active pointer and the
task's state, so readers never see a partial version. The blob is written before that MULTI (so contention
retries do not resend megabytes), in 1 MiB chunks to an expiring ``{p}upload:...`` key that is then renamed; a
blob without a version is harmless and is removed with its task.

Every write of a task WATCHes its task hash and changes it in the MULTI, so two writes of one task never
interleave; the task's ``{p}active`` entry changes only in those MULTIs and needs no WATCH of its own (watching
the shared hash would make writes of unrelated tasks conflict). A revision takes Redis's ``TIME``, read after
the WATCH: one clock for every writer, so a client with a slow clock cannot issue revisions behind the others.

Stores written before revisions hold a bare version number N in ``{p}active``: it reads as revision 0 with the
sha256 of ``v:N``, and the task's next write replaces it with the JSON state.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lpt.errors import InvalidId, NotFound, StoreUnavailable
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
    next_revision,
    sha256_hex,
    unknown_state,
    verify_blob,
)
from prompts_store.base import DEFAULT_MAX_BYTES, ChangeEvent, StoredBlob, StoredVersion, TaskState, VersionConflict

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
        self._states_key = f"{prefix}active"
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

    def _read_state(self, r: redis.Redis | redis.client.Pipeline, tenant: str, task: str) -> TaskState:
        """The task's state from ``{p}active`` (in a WATCHed pipeline: read at once, like every command there)."""
        state = _decode_state(tenant, task, r.hget(self._states_key, f"{tenant}/{task}"))
        if state.active is not None and state.sha256 is None:  # written before revisions: a bare number
            raw = r.hget(self._task_key(tenant, task), f"v:{state.active}")
            state = replace(state, sha256=json.loads(raw)["sha256"] if raw is not None else None)
        return state

    def _record(self, pipe: redis.client.Pipeline, state: TaskState) -> None:
        """Inside the caller's MULTI: store the task's new state and publish it."""
        pipe.hset(self._states_key, f"{state.tenant}/{state.task}", _encode_state(state))
        pipe.publish(self.channel, json.dumps(asdict(state)))

    @staticmethod
    def _next_revision(pipe: redis.client.Pipeline, previous: int) -> int:
        """The hybrid-clock revision after ``previous``, on Redis's clock (``TIME``, read at once)."""
        seconds, micros = pipe.time()
        return next_revision(previous, int(seconds) * 1_000_000 + int(micros))

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
                        current = self._read_state(p, tenant, task)
                        if current.active is not None and current.sha256 == sha:
                            raw = p.hget(tk, f"v:{current.active}")
                            if raw is not None:
                                return decode_info(tenant, task, current.active, raw, current.revision)
                        if not p.exists(self._blob_key(tenant, task, sha)):
                            p.unwatch()
                            self._upload_blob(tenant, task, sha, data)
                            continue
                        version = int(p.get(sk) or 0) + 1
                        revision = self._next_revision(p, current.revision)
                        info = StoredVersion(
                            tenant, task, version, sha, len(data), time.time(), meta, new=True, revision=revision
                        )
                        p.multi()
                        p.set(sk, version)
                        encoded = encode_info(sha, len(data), info.created, meta)
                        p.hset(tk, mapping={"active": version, f"v:{version}": encoded})
                        p.sadd(self._tasks_key(tenant), task)
                        p.sadd(f"{self.prefix}tenants", tenant)
                        self._record(p, TaskState(tenant, task, revision, version, sha))
                        p.execute()
                        return info
                    except redis.WatchError:
                        self._backoff(attempt)
        raise StoreUnavailable("store_contention", f"put of {tenant}/{task} lost {_MAX_ATTEMPTS} optimistic retries")

    def activate(self, tenant: str, task: str, version: int) -> StoredVersion:
        """Make an existing version active at a new revision; the active version itself writes nothing."""
        check_ids(tenant, task)
        check_version(version)
        tk = self._task_key(tenant, task)
        with self._unavailable("activate"):
            for attempt in range(_MAX_ATTEMPTS):
                with self._r.pipeline(transaction=True) as p:
                    try:
                        p.watch(tk)
                        raw = p.hget(tk, f"v:{version}")
                        if raw is None:
                            raise NotFound("not_found", f"task {task!r} has no version {version}", "version")
                        current = self._read_state(p, tenant, task)
                        info = decode_info(tenant, task, version, raw, current.revision)
                        if current.active == version:
                            return info
                        info = replace(info, revision=self._next_revision(p, current.revision))
                        p.multi()
                        p.hset(tk, "active", version)
                        self._record(p, TaskState(tenant, task, info.revision, version, info.sha256))
                        p.execute()
                        return info
                    except redis.WatchError:
                        self._backoff(attempt)
        raise StoreUnavailable("store_contention", f"activate of {tenant}/{task} lost {_MAX_ATTEMPTS} retries")

    def delete(self, tenant: str, task: str) -> None:
        """Delete a task, all its versions and blobs. Its version numbers are not reused; its revision is bumped
        and kept (the tombstone)."""
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
                        revision = self._next_revision(p, self._read_state(p, tenant, task).revision)
                        p.multi()
                        p.delete(tk, bk, *(self._blob_key(tenant, task, s) for s in shas))
                        p.srem(tasks_key, task)
                        if others == 0:
                            p.srem(f"{self.prefix}tenants", tenant)
                        self._record(p, TaskState(tenant, task, revision, None, None))
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
                        raw = p.hget(tk, f"v:{version}")
                        current = self._read_state(p, tenant, task)
                        if raw is not None:
                            info = decode_info(tenant, task, version, raw, current.revision)
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
                        state = TaskState(tenant, task, self._next_revision(p, current.revision), version, sha)
                        if current.active is not None:  # an existing task keeps its pointer
                            state = replace(state, active=current.active, sha256=current.sha256)
                        p.multi()
                        p.set(sk, max(seq, version))
                        p.hset(tk, f"v:{version}", encode_info(sha, len(data), created, meta))
                        if current.active is None:  # a new task needs an active pointer; the importer sets the real one
                            p.hset(tk, "active", version)
                            p.sadd(self._tasks_key(tenant), task)
                            p.sadd(f"{self.prefix}tenants", tenant)
                        self._record(p, state)
                        p.execute()
                        return StoredVersion(
                            tenant, task, version, sha, len(data), created, meta, revision=state.revision
                        )
                    except redis.WatchError:
                        self._backoff(attempt)
        raise StoreUnavailable("store_contention", f"restore of {tenant}/{task} lost {_MAX_ATTEMPTS} retries")

    # -- reads --------------------------------------------------------------------------------------
    def _info(self, tenant: str, task: str, version: int | None) -> StoredVersion:
        """The version's metadata at the task's revision; the state (revision and active pointer) is read first,
        in one HGET, and versions are immutable with numbers never reused, so the answer belongs to that state."""
        state = self._read_state(self._r, tenant, task)
        if version is None:
            if state.active is None:
                raise NotFound("not_found", f"task {task!r} does not exist", "task")
            version = state.active
        raw = self._r.hget(self._task_key(tenant, task), f"v:{version}")
        if raw is None:
            raise NotFound("not_found", f"task {task!r} has no version {version}", "version")
        return decode_info(tenant, task, version, raw, state.revision)

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
        with self._unavailable("list_versions"), self._r.pipeline(transaction=True) as p:
            p.hgetall(self._task_key(tenant, task))
            p.hget(self._states_key, f"{tenant}/{task}")
            fields, raw_state = p.execute()
        if not fields:
            raise NotFound("not_found", f"task {task!r} does not exist", "task")
        revision = _decode_state(tenant, task, raw_state).revision
        out = [decode_info(tenant, task, int(k[2:]), v, revision) for k, v in fields.items() if k.startswith(b"v:")]
        return sorted(out, key=lambda i: i.version)

    def state(self, tenant: str, task: str) -> TaskState:
        """The task's revision, active version and its sha256 (one HGET); a tombstone once deleted."""
        check_ids(tenant, task)
        with self._unavailable("state"):
            return self._read_state(self._r, tenant, task)

    def snapshot(self) -> Snapshot:
        with self._unavailable("snapshot"):
            raw = self._r.hgetall(self._states_key)
            out: Snapshot = {}
            for k, v in raw.items():
                tenant, _, task = k.decode().partition("/")
                out[(tenant, task)] = _decode_state(tenant, task, v)
            legacy = [s for s in out.values() if s.active is not None and s.sha256 is None]
            if legacy:  # bare numbers from before revisions: the sha256 is in the version's record
                with self._r.pipeline(transaction=False) as p:
                    for s in legacy:
                        p.hget(self._task_key(s.tenant, s.task), f"v:{s.active}")
                    infos = p.execute()
                for s, info in zip(legacy, infos, strict=True):
                    if info is not None:
                        out[(s.tenant, s.task)] = replace(s, sha256=json.loads(info)["sha256"])
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
            if msg.get("type") == "message":
                ev = _parse_message(msg["data"])
                if ev is None:
                    due = True  # something changed, but the message does not say what: a snapshot diff will
                else:
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _encode_state(state: TaskState) -> str:
    return json.dumps({"revision": state.revision, "active": state.active, "sha256": state.sha256})


def _decode_state(tenant: str, task: str, raw: bytes | None) -> TaskState:
    """A task's ``{p}active`` entry; None (never written) is revision 0, and a bare version number (written
    before revisions) is revision 0 with its sha256 left for the caller to look up."""
    if raw is None:
        return unknown_state(tenant, task)
    d = json.loads(raw)
    if isinstance(d, int):
        return TaskState(tenant, task, 0, d, None)
    return TaskState(tenant, task, int(d["revision"]), d["active"], d["sha256"])


def _well_formed(state: TaskState) -> bool:
    """A revision >= 0, and a version >= 1 with a sha256 (live) or neither (tombstone)."""
    if not _is_int(state.revision) or state.revision < 0:
        return False
    if state.active is None:
        return state.sha256 is None
    return _is_int(state.active) and state.active >= 1 and isinstance(state.sha256, str)


def _parse_message(data: bytes | str) -> ChangeEvent | None:
    """The state a change message carries, or None when it carries none: a message from a writer that predates
    revisions ({tenant, task, active}), or anything malformed (anyone with access can publish on the channel)."""
    try:
        d = json.loads(data)
        if isinstance(d, dict) and "active" in d and "revision" not in d:
            log.debug("change message without a revision (a writer from before revisions): %r", data)
            return None
        state = TaskState(
            check_tenant_id(d["tenant"]), check_task_id(d["task"]), d["revision"], d["active"], d["sha256"]
        )
        if _well_formed(state):
            return state
    except (ValueError, KeyError, TypeError, InvalidId):
        pass
    log.warning("ignoring malformed prompt store change message: %r", data)
    return None
