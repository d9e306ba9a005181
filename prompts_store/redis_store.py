"""Redis backend (one server, Sentinel or Cluster): optimistic transactions (WATCH/MULTI/EXEC, no Lua), pub/sub
plus reconciliation, ``WAIT`` for the replicas, per-tenant quotas and per-task retention.

Keys (``p`` is the prefix, ``lpt:`` by default; ids never contain ``:``, ``/``, ``{`` or ``}``, see ``lpt.ids``).
Every key of a task carries the hash tag ``{tenant/task}``, so in a Cluster all of them live in one slot and a
task's transaction runs on one node; a tenant's keys carry ``{tenant}``::

    {p}{tenant/task}:task                HASH   state -> JSON {revision, active, sha256, previous, last};
                                                v:N -> JSON {sha256, size, created, meta}
    {p}{tenant/task}:blob:{sha256}       STRING the bytes (content-addressed inside the task)
    {p}{tenant/task}:upload:{sha}:{uuid} STRING a blob being uploaded (expires after an hour)
    {p}{tenant}:tasks                    SET    every task id the tenant ever wrote (deleted ones too: tombstones)
    {p}{tenant}:usage                    HASH   tasks -> live tasks; bytes -> bytes stored (the quotas' counters)
    {p}tenants                           SET    every tenant that ever wrote (written when a tenant first appears)
    channel {p}changes                   JSON {tenant, task, revision, active, sha256} published inside the MULTI

A version becomes visible only through the MULTI that writes its ``v:N`` field and the task's ``state`` together
(and renames its uploaded blob into place), so readers never see a partial version; the task's ``state`` field
is its revision, active version and sha256: ``state()`` is one HGET. ``state`` outlives a delete (the tombstone)
with ``last``, the last version number issued, so numbers never repeat. A revision takes ``TIME`` from the
primary that holds the task, read after the WATCH.

Writes of a task WATCH its one hash and run WATCH ... EXEC on one connection to the primary that holds it (in a
Cluster: the node of the task's slot), followed by ``WAIT`` for the replicas known to be up (see
``Topology.replicas_to_wait``): a write is acknowledged once every such replica holds it, or fails with
``StoreUnavailable`` (code ``store_unreplicated``; the write is on the primary, retrying the same bytes is safe).

The tenant's counters live in another slot than its tasks, so a write reserves what it adds first (an atomic
check against the quotas and increment of ``{p}{tenant}:usage``), then commits the task, then returns what the
commit did not use and subtracts what retention freed. A crash between the steps leaves the counters too high,
never too low: quotas can refuse early, never let a tenant past its limit; ``lpt store gc`` recounts them.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from typing import Any, TypeVar

import redis

from lpt.errors import NotFound, StoreUnavailable, VersionConflict
from lpt.ids import check_tenant_id
from lpt.prompt_set import MAX_PROMPT_BYTES
from prompts_store._common import (
    PutPlan,
    Snapshot,
    check_ids,
    check_put,
    check_quotas,
    check_version,
    decode_info,
    encode_info,
    next_revision,
    plan_put,
    sha256_hex,
    verify_blob,
    versions_to_prune,
)
from prompts_store.base import ChangeEvent, GcReport, Quotas, StoredBlob, StoredVersion, TaskState, TenantUsage
from prompts_store.redis_legacy import migrate_legacy_layout
from prompts_store.redis_session import Session, TaskRecord, decode_state, encode_state
from prompts_store.redis_topology import CLUSTER_ERRORS, Topology
from prompts_store.redis_urls import parse_redis_url, redact_url
from prompts_store.redis_watcher import RedisWatcher

__all__ = ["RedisPromptStore", "redact_url"]

T = TypeVar("T")

# Optimistic transactions retry on conflict; this bounds a put under pathological contention.
_MAX_ATTEMPTS = 500
# Blob upload chunk: small enough to cross a slow link within one socket timeout.
_CHUNK = 1 << 20
_UPLOAD_TTL_S = 3600
_RETRY: Any = object()  # what a transaction attempt returns when a watched key changed


class RedisPromptStore:
    """Prompt store on Redis or Valkey: one server, Sentinel, or Cluster. Thread-safe (redis-py pools connections).

    Every Redis failure (refused, timeout, paused, auth, loading, failover, response error) surfaces as
    ``StoreUnavailable`` after at most about ``timeout_s`` (a write: per round trip): socket and connect
    timeouts are ``timeout_s``, timeouts are never retried. A write that raises ``StoreUnavailable`` may or may
    not have been applied; retrying it with the same bytes is safe (an equal active version is returned).

    Args:
        url: a URL of ``prompts_store.redis_urls`` (``redis://``, ``rediss://``, ``unix://``,
            ``redis+sentinel://``, ``rediss+sentinel://``, ``redis+cluster://``, ``rediss+cluster://``).
        max_bytes: largest blob ``put`` accepts.
        timeout_s: socket and connect timeout in seconds.
        prefix: key prefix, to share a Redis database with other data (no ``{`` or ``}``).
        health_check_interval: seconds of idleness after which a pooled connection is PINGed before use.
        quotas: per-tenant limits and retention (none by default).
    """

    def __init__(
        self,
        url: str,
        max_bytes: int = MAX_PROMPT_BYTES,
        timeout_s: float = 0.5,
        prefix: str = "lpt:",
        health_check_interval: int = 10,
        quotas: Quotas | None = None,
    ):
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain '{' or '}' (they delimit hash tags)")
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.prefix = prefix
        self.quotas = quotas or Quotas()
        self.url = redact_url(url)
        self.channel = f"{prefix}changes"
        self.tenants_key = f"{prefix}tenants"
        self._topology = Topology(parse_redis_url(url), timeout_s, health_check_interval)
        # WAIT must answer before the socket timeout does.
        self._wait_ms = max(1, int(timeout_s * 500))
        self._layout_lock = threading.Lock()
        self._layout_checked = False

    def __repr__(self) -> str:
        return f"RedisPromptStore({self.url!r})"

    @property
    def topology(self) -> str:
        """``server``, ``sentinel`` or ``cluster``."""
        return self._topology.kind

    # -- keys ---------------------------------------------------------------------------------------
    def task_key(self, tenant: str, task: str) -> str:
        return f"{self.prefix}{{{tenant}/{task}}}:task"

    def blob_key(self, tenant: str, task: str, sha: str) -> str:
        return f"{self.prefix}{{{tenant}/{task}}}:blob:{sha}"

    def _upload_key(self, tenant: str, task: str, sha: str) -> str:
        return f"{self.prefix}{{{tenant}/{task}}}:upload:{sha}:{uuid.uuid4().hex}"

    def tasks_key(self, tenant: str) -> str:
        return f"{self.prefix}{{{tenant}}}:tasks"

    def usage_key(self, tenant: str) -> str:
        return f"{self.prefix}{{{tenant}}}:usage"

    # -- plumbing -----------------------------------------------------------------------------------
    @contextmanager
    def _unavailable(self, what: str) -> Iterator[None]:
        try:
            self._ensure_layout()
            yield
        except (redis.RedisError, OSError, *CLUSTER_ERRORS) as e:
            self._topology.refresh()  # in a Cluster, a node may be gone or a slot moved
            raise StoreUnavailable(
                "store_unavailable", f"redis {what} failed ({self.url}): {type(e).__name__}: {e}"
            ) from e

    def _ensure_layout(self) -> None:
        """Once per store object: move a layout written before hash tags into this one (one server or Sentinel)."""
        if self._layout_checked:
            return
        with self._layout_lock:
            if not self._layout_checked:
                if self._topology.kind != "cluster":
                    migrate_legacy_layout(self, self._topology.client)
                self._layout_checked = True

    def _session(self, key: str) -> Session:
        return Session(self._topology.node(key))

    def _optimistic(self, what: str, attempt: Callable[[int], T]) -> T:
        """Run ``attempt`` until it returns something else than ``_RETRY`` (a watched key changed, or a Cluster
        slot moved), pausing with jitter between attempts."""
        for n in range(_MAX_ATTEMPTS):
            try:
                result = attempt(n)
            except (redis.exceptions.MovedError, redis.exceptions.AskError):
                self._topology.refresh()
                result = _RETRY
            if result is not _RETRY:
                return result
            # Jitter spreads contending writers out so one of them wins each round.
            time.sleep(random.uniform(0, min(0.02, 0.001 * (1 << min(n, 5)))))
        raise StoreUnavailable("store_contention", f"{what} lost {_MAX_ATTEMPTS} optimistic retries")

    def _read_task(self, s: Session, tenant: str, task: str) -> TaskRecord:
        return TaskRecord.parse(tenant, task, s("HGETALL", self.task_key(tenant, task)) or {})

    @contextmanager
    def _watching(self, tenant: str, task: str, *also: str) -> Iterator[tuple[Session, TaskRecord]]:
        """A session on the task's primary that WATCHes its hash (and the keys ``also``), with the task as read
        after the WATCH: what one optimistic attempt at writing the task decides from."""
        tk = self.task_key(tenant, task)
        with self._session(tk) as s:
            s("WATCH", tk, *also)
            yield s, self._read_task(s, tenant, task)

    def _replicate(self, s: Session) -> None:
        """``WAIT`` until the replicas known to be up hold this connection's writes; raise when they do not."""
        needed = self._topology.replicas_to_wait(s("ROLE") if self._topology.asks_role else None)
        if needed == 0:
            return
        acked = int(s("WAIT", needed, self._wait_ms))
        if acked < needed:
            raise StoreUnavailable(
                "store_unreplicated",
                f"the write reached {acked} of {needed} replicas within {self._wait_ms} ms ({self.url}): it is on "
                "the primary but could be lost in a failover; retry it",
            )

    def _message(self, state: TaskState) -> tuple[str, str, str]:
        return ("PUBLISH", self.channel, json.dumps(asdict(state)))

    # -- tenants: index and counters ----------------------------------------------------------------
    def _register(self, tenant: str, task: str) -> None:
        """Before a task's first write: the tenant in the registry, the task in the tenant's index (so a snapshot
        finds every state the store holds); the global key is written only when a tenant is new."""
        client = self._topology.client
        if not client.sismember(self.tenants_key, tenant):
            client.sadd(self.tenants_key, tenant)
        client.sadd(self.tasks_key(tenant), task)

    def _read_usage(self, s: Session | None, tenant: str) -> TenantUsage:
        """The tenant's counters, in the session (under its WATCH) or with the plain client."""
        key = self.usage_key(tenant)
        reply = (
            s("HMGET", key, "tasks", "bytes") if s is not None else self._topology.client.hmget(key, "tasks", "bytes")
        )
        tasks, stored = (int(x) if x is not None else 0 for x in reply)
        return TenantUsage(tasks, stored)

    def _limited(self) -> bool:
        return self.quotas.max_tasks_per_tenant is not None or self.quotas.max_bytes_per_tenant is not None

    def _count(self, tenant: str, tasks: int, nbytes: int, freed: int = 0, check: bool = False) -> None:
        """Add ``tasks`` and ``nbytes`` (negative: subtract) to the tenant's counters; with ``check``, first refuse
        (``QuotaExceeded``) when that would pass a quota, ``freed`` being what the same write frees."""
        if tasks == 0 and nbytes == 0:
            return
        key = self.usage_key(tenant)
        checked = check and self._limited() and (tasks > 0 or nbytes > freed)

        def attempt(_n: int) -> Any:
            with self._session(key) as s:
                if checked:
                    s("WATCH", key)
                    check_quotas(self.quotas, tenant, self._read_usage(s, tenant), tasks, nbytes, freed)
                if s.execute([("HINCRBY", key, "tasks", tasks), ("HINCRBY", key, "bytes", nbytes)]) is None:
                    return _RETRY
                if tasks > 0 or nbytes > 0:  # a lost increment would let a tenant past its quota after a failover
                    self._replicate(s)
                return True

        self._optimistic(f"usage of {tenant}", attempt)

    # -- writes -------------------------------------------------------------------------------------
    def _upload_blob(self, tmp: str, data: bytes) -> None:
        """Write the blob under an expiring temporary key in chunks; the version's transaction renames it.

        Chunks because the socket timeout bounds each ``sendall`` as a whole: 64 MiB in one command would need
        more than a short timeout on a real network. An upload cut off by a crash expires by itself.
        """
        view = memoryview(data)
        client = self._topology.client
        try:
            for off in range(0, max(len(data), 1), _CHUNK):
                with client.pipeline(transaction=False) as p:
                    p.append(tmp, view[off : off + _CHUNK])
                    p.expire(tmp, _UPLOAD_TTL_S)
                    p.execute()
        except redis.RedisError:
            with suppress(redis.RedisError):
                client.delete(tmp)
            raise

    def _confirm(self, s: Session, rec: TaskRecord, result: T) -> T:
        """An answer that writes nothing (an idempotent put or activate) is still only given once the replicas
        hold the state it reports: rewrite the state unchanged, then ``WAIT``. Without replicas, nothing."""
        needed = self._topology.replicas_to_wait(s("ROLE") if self._topology.asks_role else None)
        if needed == 0 or rec.raw_state is None:
            return result
        if s.execute([("HSET", self.task_key(rec.tenant, rec.task), "state", rec.raw_state)]) is None:
            return _RETRY
        self._replicate(s)
        return result

    def put(self, tenant: str, task: str, data: bytes, meta: dict[str, str] | None = None) -> StoredVersion:
        """Store ``data`` as a new version and activate it; bytes equal to the active version return it. Quotas
        are checked before the bytes are sent and again, atomically, before the commit; retention deletes the
        oldest inactive versions in the same transaction.

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
        upload: list[str] = []  # the temporary key holding the bytes, once sent
        reserved = [0, 0]  # (tasks, bytes) added to the counters for this put and not yet committed
        unknown = [False]  # an EXEC was sent and its outcome is not known: keep the reservation

        def attempt(_n: int) -> Any:
            with self._watching(tenant, task, *upload) as (s, rec):
                if rec.active is not None and rec.sha256 == sha:
                    return self._confirm(s, rec, rec.info(rec.active))
                plan = plan_put(rec.blobs(), rec.active, rec.last, sha, len(data), self.quotas.keep_inactive_versions)
                if not plan.blob_stored and not (upload and s("EXISTS", upload[0])):
                    s("UNWATCH")
                    if self._limited():  # refuse before sending megabytes
                        check_quotas(
                            self.quotas, tenant, self._read_usage(None, tenant),
                            int(plan.new_task), plan.added_bytes, plan.freed_bytes,
                        )  # fmt: skip
                    upload[:] = [self._upload_key(tenant, task, sha)]
                    self._upload_blob(upload[0], data)
                    return _RETRY
                want = (int(plan.new_task), plan.added_bytes)
                self._count(tenant, want[0] - reserved[0], want[1] - reserved[1], plan.freed_bytes, check=True)
                reserved[:] = want
                info = StoredVersion(
                    tenant, task, plan.version, sha, len(data), time.time(), meta, new=True,
                    revision=next_revision(rec.revision, s.time_us()),
                )  # fmt: skip
                unknown[0] = True
                if s.execute(self._put_commands(rec, plan, info, None if plan.blob_stored else upload[0])) is None:
                    unknown[0] = False
                    return _RETRY
                upload.clear()  # renamed into place
                reserved[:] = [0, 0]
                unknown[0] = False
                self._count(tenant, 0, -plan.freed_bytes)
                self._replicate(s)
                return info

        try:
            with self._unavailable("put"):
                self._register(tenant, task)
                return self._optimistic(f"put of {tenant}/{task}", attempt)
        finally:
            self._clean_up_put(tenant, upload, reserved, unknown[0])

    def _put_commands(
        self, rec: TaskRecord, plan: PutPlan, info: StoredVersion, uploaded: str | None
    ) -> list[tuple[Any, ...]]:
        tenant, task = rec.tenant, rec.task
        tk, blob = self.task_key(tenant, task), self.blob_key(tenant, task, info.sha256)
        state = encode_state(info.revision, info.version, info.sha256, rec.active, info.version)
        commands: list[tuple[Any, ...]] = []
        if uploaded is not None:
            commands += [("RENAME", uploaded, blob), ("PERSIST", blob)]
        encoded = encode_info(info.sha256, info.size, info.created, info.meta)
        commands.append(("HSET", tk, "state", state, f"v:{info.version}", encoded))
        if plan.pruned:
            commands.append(("HDEL", tk, *(f"v:{v}" for v in plan.pruned)))
        if plan.dropped_blobs:
            commands.append(("DEL", *(self.blob_key(tenant, task, s) for s in plan.dropped_blobs)))
        commands.append(self._message(TaskState(tenant, task, info.revision, info.version, info.sha256)))
        return commands

    def _clean_up_put(self, tenant: str, upload: list[str], reserved: list[int], unknown: bool) -> None:
        """After a put that did not commit: drop its uploaded bytes and give back what it reserved (unless its
        EXEC may have run: then the reservation stays, and the counters over-count until ``gc``)."""
        if upload:
            with suppress(redis.RedisError, *CLUSTER_ERRORS):
                self._topology.client.delete(upload[0])
        if any(reserved) and not unknown:
            with suppress(redis.RedisError, StoreUnavailable, *CLUSTER_ERRORS):
                self._count(tenant, -reserved[0], -reserved[1])

    def activate(self, tenant: str, task: str, version: int) -> StoredVersion:
        """Make an existing version active at a new revision; the active version itself writes nothing."""
        check_ids(tenant, task)
        check_version(version)
        tk = self.task_key(tenant, task)

        def attempt(_n: int) -> Any:
            with self._watching(tenant, task) as (s, rec):
                if version not in rec.versions or rec.active is None:
                    raise NotFound("not_found", f"task {task!r} has no version {version}", "version")
                if rec.active == version:
                    return self._confirm(s, rec, rec.info(version))
                info = rec.info(version, next_revision(rec.revision, s.time_us()))
                state = encode_state(info.revision, version, info.sha256, rec.active, rec.last)
                commands = [
                    ("HSET", tk, "state", state),
                    self._message(TaskState(tenant, task, info.revision, version, info.sha256)),
                ]
                if s.execute(commands) is None:
                    return _RETRY
                self._replicate(s)
                return info

        with self._unavailable("activate"):
            return self._optimistic(f"activate of {tenant}/{task}", attempt)

    def delete(self, tenant: str, task: str) -> None:
        """Delete a task, all its versions and blobs. Its version numbers are not reused; its revision is bumped
        and kept (the tombstone)."""
        check_ids(tenant, task)
        tk = self.task_key(tenant, task)

        def attempt(_n: int) -> Any:
            with self._watching(tenant, task) as (s, rec):
                if rec.active is None:
                    raise NotFound("not_found", f"task {task!r} does not exist", "task")
                blobs = dict(rec.blobs().values())
                revision = next_revision(rec.revision, s.time_us())
                commands: list[tuple[Any, ...]] = [
                    ("HDEL", tk, *(f"v:{v}" for v in rec.versions)),
                    ("HSET", tk, "state", encode_state(revision, None, None, None, rec.last)),
                ]
                if blobs:
                    commands.append(("DEL", *(self.blob_key(tenant, task, sha) for sha in blobs)))
                commands.append(self._message(TaskState(tenant, task, revision, None, None)))
                if s.execute(commands) is None:
                    return _RETRY
                self._count(tenant, -1, -sum(blobs.values()))
                self._replicate(s)
                return True

        with self._unavailable("delete"):
            self._optimistic(f"delete of {tenant}/{task}", attempt)

    def restore_version(
        self, tenant: str, task: str, version: int, data: bytes, created: float, meta: dict[str, str] | None = None
    ) -> StoredVersion:
        """Write a version with a given number (backup import; counted in the usage, but quotas and retention do
        not refuse or delete anything: ``lpt store gc`` applies retention afterwards). See
        ``base.SupportsRestore``."""
        check_ids(tenant, task)
        check_version(version)
        meta = check_put(data, meta, self.max_bytes)
        data = bytes(data)
        sha = sha256_hex(data)
        tk = self.task_key(tenant, task)
        upload: list[str] = []
        unknown = [False]

        def attempt(_n: int) -> Any:
            with self._watching(tenant, task, *upload) as (s, rec):
                if version in rec.versions:
                    info = rec.info(version)
                    if info.sha256 != sha:
                        raise VersionConflict(
                            "version_conflict", f"{tenant}/{task} v{version} exists with other bytes", "version"
                        )
                    return info
                blobs = rec.blobs()
                have_blob = any(s_ == sha for s_, _ in blobs.values())
                if not have_blob and not (upload and s("EXISTS", upload[0])):
                    s("UNWATCH")
                    upload[:] = [self._upload_key(tenant, task, sha)]
                    self._upload_blob(upload[0], data)
                    return _RETRY
                revision = next_revision(rec.revision, s.time_us())
                new_task = rec.active is None
                active, active_sha = (version, sha) if new_task else (rec.active, rec.sha256)
                state = encode_state(revision, active, active_sha, rec.previous, max(rec.last, version))
                blob = self.blob_key(tenant, task, sha)
                commands: list[tuple[Any, ...]] = (
                    [("RENAME", upload[0], blob), ("PERSIST", blob)] if not have_blob else []
                )
                commands += [
                    ("HSET", tk, "state", state, f"v:{version}", encode_info(sha, len(data), created, meta)),
                    self._message(TaskState(tenant, task, revision, active, active_sha)),
                ]
                unknown[0] = True
                if s.execute(commands) is None:
                    unknown[0] = False
                    return _RETRY
                upload.clear()
                unknown[0] = False
                self._count(tenant, int(new_task), 0 if have_blob else len(data))
                self._replicate(s)
                return StoredVersion(tenant, task, version, sha, len(data), created, meta, revision=revision)

        try:
            with self._unavailable("restore"):
                self._register(tenant, task)
                return self._optimistic(f"restore of {tenant}/{task}", attempt)
        finally:
            self._clean_up_put(tenant, upload, [0, 0], unknown[0])

    # -- maintenance --------------------------------------------------------------------------------
    def usage(self, tenant: str) -> TenantUsage:
        """The tenant's counters: live tasks and stored bytes (each distinct blob of each task once)."""
        check_tenant_id(tenant)
        with self._unavailable("usage"):
            return self._read_usage(None, tenant)

    def gc(self, keep_inactive_versions: int | None = None) -> GcReport:
        """Apply retention to every task (one transaction each), then recount every tenant's counters. See
        ``base.SupportsMaintenance``. A put that commits while its tenant is recounted may be left out of the
        count until the next ``gc``: run it when uploads are quiet."""
        keep = self.quotas.keep_inactive_versions if keep_inactive_versions is None else keep_inactive_versions
        report = GcReport()
        with self._unavailable("gc"):
            for tenant, tasks in self._index().items():
                for task in tasks:
                    if keep is not None:
                        report += self._optimistic(f"gc of {tenant}/{task}", self._pruner(tenant, task, keep))
                self._recount_tenant(tenant, tasks)
        return report

    def _recount_tenant(self, tenant: str, tasks: list[str] | None = None) -> TenantUsage:
        """Set the tenant's counters to what its tasks hold (its index's tasks unless ``tasks`` is given)."""
        if tasks is None:
            tasks = sorted(t.decode() for t in self._topology.client.smembers(self.tasks_key(tenant)))
        return self._optimistic(f"recount of {tenant}", lambda _n: self._recount(tenant, tasks))

    def _pruner(self, tenant: str, task: str, keep: int) -> Callable[[int], GcReport]:
        tk = self.task_key(tenant, task)

        def attempt(_n: int) -> Any:
            with self._watching(tenant, task) as (s, rec):
                if rec.active is None:
                    return GcReport()
                previous = rec.previous
                if previous is None:  # not recorded: the newest version below the active one
                    previous = max((v for v in rec.versions if v < rec.active), default=None)
                pruned = versions_to_prune(rec.versions, rec.active, previous, keep)
                if not pruned:
                    return GcReport()
                blobs = rec.blobs()
                kept = {blobs[v][0] for v in blobs if v not in pruned}
                dropped = {blobs[v][0]: blobs[v][1] for v in pruned if blobs[v][0] not in kept}
                commands: list[tuple[Any, ...]] = [("HDEL", tk, *(f"v:{v}" for v in pruned))]
                if dropped:
                    commands.append(("DEL", *(self.blob_key(tenant, task, sha) for sha in dropped)))
                if s.execute(commands) is None:
                    return _RETRY
                self._replicate(s)
                return GcReport(1, len(pruned), sum(dropped.values()))

        return attempt

    def _recount(self, tenant: str, tasks: list[str]) -> Any:
        """Set the tenant's counters to what its tasks hold (WATCHing them, so a reservation meanwhile retries)."""
        key = self.usage_key(tenant)
        with self._session(key) as s:
            s("WATCH", key)
            live, stored = 0, 0
            for task in tasks:
                rec = TaskRecord.parse(tenant, task, self._topology.client.hgetall(self.task_key(tenant, task)))
                if rec.active is not None:
                    live += 1
                    stored += sum(dict(rec.blobs().values()).values())
            if s.execute([("HSET", key, "tasks", live, "bytes", stored)]) is None:
                return _RETRY
            return TenantUsage(live, stored)

    # -- reads --------------------------------------------------------------------------------------
    def _info(self, tenant: str, task: str, version: int | None) -> StoredVersion:
        """The version's metadata at the task's revision; the state (revision and active pointer) is read first,
        and versions are immutable with numbers never reused, so the answer belongs to that state."""
        client, tk = self._topology.client, self.task_key(tenant, task)
        state = decode_state(tenant, task, client.hget(tk, "state"))
        if version is None:
            if state.active is None:
                raise NotFound("not_found", f"task {task!r} does not exist", "task")
            version = state.active
        raw = client.hget(tk, f"v:{version}")
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
            data = self._topology.client.get(self.blob_key(tenant, task, info.sha256))
        if data is None:  # deleted (or pruned) between the two reads
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
            tasks = sorted(t.decode() for t in self._topology.client.smembers(self.tasks_key(tenant)))
            states = self._states({tenant: tasks})
        return [task for (_, task), s in sorted(states.items()) if s.active is not None]

    def list_tenants(self) -> list[str]:
        """Tenants with at least one live task."""
        return sorted({tenant for (tenant, _), state in self.snapshot().items() if state.active is not None})

    def list_versions(self, tenant: str, task: str) -> list[StoredVersion]:
        check_ids(tenant, task)
        with self._unavailable("list_versions"):
            rec = TaskRecord.parse(tenant, task, self._topology.client.hgetall(self.task_key(tenant, task)))
        if rec.active is None:
            raise NotFound("not_found", f"task {task!r} does not exist", "task")
        return [rec.info(v) for v in sorted(rec.versions)]

    def state(self, tenant: str, task: str) -> TaskState:
        """The task's revision, active version and its sha256 (one HGET); a tombstone once deleted."""
        check_ids(tenant, task)
        with self._unavailable("state"):
            return decode_state(tenant, task, self._topology.client.hget(self.task_key(tenant, task), "state"))

    def _index(self) -> dict[str, list[str]]:
        """Every tenant of the registry -> every task of its index (live or deleted, sorted)."""
        client = self._topology.client
        tenants = sorted(t.decode() for t in client.smembers(self.tenants_key))
        with client.pipeline(transaction=False) as p:
            for tenant in tenants:
                p.smembers(self.tasks_key(tenant))
            members = p.execute()
        return {tenant: sorted(t.decode() for t in tasks) for tenant, tasks in zip(tenants, members, strict=True)}

    def _states(self, index: dict[str, list[str]]) -> Snapshot:
        """The state of every task of ``index`` that has one (pipelined; in a Cluster, grouped by node)."""
        keys = [(tenant, task) for tenant, tasks in index.items() for task in tasks]
        with self._topology.client.pipeline(transaction=False) as p:
            for tenant, task in keys:
                p.hget(self.task_key(tenant, task), "state")
            raws = p.execute()
        return {key: decode_state(*key, raw) for key, raw in zip(keys, raws, strict=True) if raw is not None}

    def snapshot(self) -> Snapshot:
        """Every task's state, tombstones included (a tombstone at revision 0 carries nothing and is left out)."""
        with self._unavailable("snapshot"):
            states = self._states(self._index())
        return {key: s for key, s in states.items() if s.active is not None or s.revision > 0}

    def ping(self) -> None:
        with self._unavailable("ping"):
            self._topology.client.ping()

    # -- notifications ------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[ChangeEvent], None], reconcile_s: float = 2.0) -> RedisWatcher:
        """Deliver changes from pub/sub as they happen and from a snapshot diff every ``reconcile_s``.

        Never raises for an unreachable Redis: the watcher thread retries (backoff up to 1 s) and diffs a
        fresh snapshot as soon as it is back, so changes made during an outage arrive then. In a Cluster the
        watcher listens on one node; Redis forwards every PUBLISH to all nodes.
        """
        watcher = RedisWatcher(self, callback, reconcile_s)
        watcher.start(self.snapshot)
        return watcher

    def pubsub(self) -> Any:
        """A pub/sub object on the change channel's connection (the store's watcher uses it)."""
        with self._unavailable("subscribe"):
            return self._topology.client.pubsub(ignore_subscribe_messages=True)

    def close(self) -> None:
        self._topology.close()
