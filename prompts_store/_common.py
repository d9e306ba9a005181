"""Pieces both backends share: argument checks, metadata encoding, the revision clock, retention and quota
arithmetic, snapshot diffs, the watcher."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from lpt.errors import InvalidVersion, QuotaExceeded, StoreCorrupt, StoreUnavailable, TooLarge
from lpt.ids import check_task_id, check_tenant_id
from prompts_store.base import ChangeEvent, Quotas, StoredVersion, TaskState, TenantUsage

log = logging.getLogger("prompts_store")

# Metadata is for small facts (num_classes, backbone fingerprint); a cap keeps it from becoming a side channel
# for large payloads that bypass the size limit.
MAX_META_ITEMS = 64
MAX_META_BYTES = 16 * 1024

Snapshot = dict[tuple[str, str], TaskState]


def next_revision(previous: int, now_us: int | None = None) -> int:
    """The revision a write gives a task: a hybrid clock, one past ``previous`` but never behind the wall clock.

    The counter part keeps revisions growing when the clock stands still or steps back. The clock part keeps
    them growing across data loss: a store that lost the task's last writes (or was wiped and re-imported)
    restarts from a lower ``previous``, but every revision issued before the loss is at most the time of that
    write in microseconds (a task gets far less than one write per microsecond), so a later write is above it.

    Args:
        previous: the task's current revision (0 if it has none).
        now_us: the writer's time in microseconds since the epoch; the local wall clock when None.
    """
    if now_us is None:
        now_us = time.time_ns() // 1000
    return max(previous + 1, now_us)


def unknown_state(tenant: str, task: str) -> TaskState:
    """The state of a task the store does not hold at all (never written, or lost)."""
    return TaskState(tenant, task, 0, None, None)


def check_ids(tenant: str, task: str) -> None:
    """Validate both ids before either touches a key or a query."""
    check_tenant_id(tenant)
    check_task_id(task)


def check_version(version: object) -> int:
    """Versions are positive ints; bools are rejected although they are ints."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidVersion(message=f"version must be a positive integer, got {version!r}", field="version")
    return version


def check_put(data: bytes, meta: dict[str, str] | None, max_bytes: int) -> dict[str, str]:
    """Size and metadata checks that must pass before anything is written.

    Args:
        data: the prompt-set bytes.
        meta: caller metadata (string keys and values).
        max_bytes: the store's size limit.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise TooLarge("too_large", f"prompt set is {len(data)} bytes; the limit is {max_bytes}", "data")
    meta = dict(meta or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("meta must map str to str")  # a caller bug, not a client error
    if len(meta) > MAX_META_ITEMS:
        raise TooLarge("too_large", f"meta has more than {MAX_META_ITEMS} items", "meta")
    if len(json.dumps(meta)) > MAX_META_BYTES:
        raise TooLarge("too_large", f"meta exceeds {MAX_META_BYTES} bytes", "meta")
    return meta


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_info(sha256: str, size: int, created: float, meta: dict[str, str]) -> str:
    """The JSON stored per version (Redis hash field; the SQLite backend uses columns instead)."""
    return json.dumps({"sha256": sha256, "size": size, "created": created, "meta": meta}, sort_keys=True)


def decode_info(tenant: str, task: str, version: int, raw: str | bytes, revision: int = 0) -> StoredVersion:
    """A version's metadata from ``encode_info``'s JSON, stamped with the task ``revision`` it was read at."""
    d = json.loads(raw)
    size, created, meta = int(d["size"]), float(d["created"]), dict(d["meta"])
    return StoredVersion(tenant, task, version, d["sha256"], size, created, meta, revision=revision)


def verify_blob(info: StoredVersion, data: bytes) -> None:
    """Refuse to hand out bytes whose checksum does not match: a torn or corrupted blob must never load."""
    if len(data) != info.size or sha256_hex(data) != info.sha256:
        raise StoreCorrupt(
            "store_corrupt", f"blob of {info.tenant}/{info.task} v{info.version} fails its sha256 check", "data"
        )


def versions_to_prune(
    versions: Iterable[int], active: int, previous: int | None, keep_inactive: int | None
) -> list[int]:
    """The versions retention deletes: every inactive one but the newest ``keep_inactive``, where ``previous`` (the
    version active before ``active``) is always kept and counts as one of them.

    Args:
        versions: the task's version numbers, ``active`` among them.
        active: the active version (never deleted).
        previous: the version active before it, or None.
        keep_inactive: inactive versions to keep; None keeps them all.
    """
    if keep_inactive is None:
        return []
    inactive = sorted((v for v in versions if v != active), reverse=True)
    kept = {previous} if previous in inactive else set()
    for v in inactive:
        if len(kept) >= keep_inactive:
            break
        kept.add(v)
    return sorted(v for v in inactive if v not in kept)


def blob_bytes(blobs: Iterable[tuple[str, int]]) -> int:
    """Bytes the (sha256, size) pairs of a task's versions occupy: each distinct blob once."""
    return sum(dict(blobs).values())


@dataclass(frozen=True)
class PutPlan:
    """What one ``put`` of new bytes changes in a task, computed from the task's versions before it.

    Attributes:
        version: the number the new version gets.
        pruned: the versions retention deletes in the same transaction.
        dropped_blobs: sha256 of the blobs no kept version references afterwards.
        new_task: whether the task has no live versions before the put (it counts against the task quota).
        blob_stored: whether a version of the task already holds the same bytes (nothing to upload).
        added_bytes: bytes the new blob adds (0 when it is stored already).
        freed_bytes: bytes the dropped blobs free.
    """

    version: int
    pruned: list[int]
    dropped_blobs: list[str]
    new_task: bool
    blob_stored: bool
    added_bytes: int
    freed_bytes: int


def plan_put(
    versions: Mapping[int, tuple[str, int]], active: int | None, last: int, sha: str, size: int, keep: int | None
) -> PutPlan:
    """The effect of putting blob ``sha`` (``size`` bytes) as version ``last + 1`` of a task.

    Args:
        versions: the task's live versions, number -> (sha256, size).
        active: the active version before the put (None: the task does not exist); it becomes the previous one.
        last: the last version number issued.
        sha: the new blob's sha256.
        size: its length.
        keep: inactive versions to keep (``Quotas.keep_inactive_versions``).
    """
    version = last + 1
    pruned = versions_to_prune([*versions, version], version, active, keep)
    kept_blobs = {versions[v][0] for v in versions if v not in pruned} | {sha}
    dropped = {versions[v][0]: versions[v][1] for v in pruned if versions[v][0] not in kept_blobs}
    stored = any(s == sha for s, _ in versions.values())
    return PutPlan(version, pruned, sorted(dropped), not versions, stored, 0 if stored else size, sum(dropped.values()))


def check_quotas(quotas: Quotas, tenant: str, usage: TenantUsage, new_tasks: int, added: int, freed: int) -> None:
    """Raise ``QuotaExceeded`` when a write would take ``tenant`` past a quota; only what a write adds is checked,
    so a tenant above a limit lowered since can still replace, roll back and delete.

    Args:
        quotas: the limits.
        tenant: whose use it is.
        usage: the tenant's use before the write.
        new_tasks: tasks the write creates (0 or 1).
        added: bytes the write adds.
        freed: bytes the same write frees (retention), counted against ``added``.
    """
    limit = quotas.max_tasks_per_tenant
    if new_tasks > 0 and limit is not None and usage.tasks + new_tasks > limit:
        raise QuotaExceeded(
            f"tenant {tenant!r} has {usage.tasks} tasks; the limit (max_tasks_per_tenant) is {limit}: "
            "delete a task first",
            "max_tasks_per_tenant",
            limit,
            usage.tasks,
            new_tasks,
        )
    limit = quotas.max_bytes_per_tenant
    if added > freed and limit is not None and usage.bytes + added - freed > limit:
        raise QuotaExceeded(
            f"tenant {tenant!r} stores {usage.bytes} bytes of prompt sets and this upload adds {added - freed}; "
            f"the limit (max_bytes_per_tenant) is {limit} bytes: delete versions or tasks first",
            "max_bytes_per_tenant",
            limit,
            usage.bytes,
            added - freed,
        )


def diff_snapshots(old: Snapshot, new: Snapshot) -> list[ChangeEvent]:
    """Events that turn ``old`` into ``new``: every state of ``new`` that differs from ``old`` (tombstones
    included), then a revision-0 state for each task ``new`` no longer holds at all (lost, not deleted).

    States are compared whole; two states of a task differ in their revision unless a writer without revisions
    changed it.
    """
    events = [s for key, s in sorted(new.items()) if old.get(key, unknown_state(*key)) != s]
    lost = (unknown_state(*key) for key in sorted(old) if key not in new)
    return events + [s for s in lost if old[(s.tenant, s.task)] != s]


class Watcher:
    """A daemon thread that turns backend changes into ``ChangeEvent`` callbacks.

    Subclasses implement ``_wait(timeout)`` (block up to ``timeout`` for push messages or a cheap change
    hint, returning events it already knows about plus whether a snapshot diff is due) and ``_snapshot()``.
    This class owns the loop: baseline, periodic reconciliation, deduplication against the last known
    state, error logging with backoff, and prompt shutdown on ``close()``. The thread never dies on a backend
    or callback error, so a replica keeps receiving changes after Redis or the disk comes back.

    Events are states ("task X is now at revision R, version N, sha256 S"). A pushed state is delivered only
    if its revision is above the last one known for the task, so a late message never follows a newer state.
    A reconciled snapshot is the store's truth and is delivered whenever it differs from what was known (a
    lower revision there means the store lost writes). The last event delivered for a task is its current
    state. Callbacks run on this thread and should be quick (hand work to a queue).

    Args:
        callback: called with each ``ChangeEvent``.
        reconcile_s: how often a full snapshot diff runs even without push messages.
        name: thread name, for logs and debugging.
    """

    max_backoff_s = 1.0

    def __init__(self, callback: Callable[[ChangeEvent], None], reconcile_s: float, name: str):
        if reconcile_s <= 0:
            raise ValueError("reconcile_s must be > 0")
        self._callback = callback
        self._reconcile_s = reconcile_s
        self._stop = threading.Event()
        self._known: Snapshot | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, read_baseline: Callable[[], Snapshot]) -> None:
        """Start the thread from the store's state as ``read_baseline`` reads it now, before the subscriber
        returns, so every later change is delivered. A store unreachable now is not an error: the first
        snapshot the thread reads is then delivered in full."""
        try:
            self._known = read_baseline()
        except StoreUnavailable as e:
            log.warning("prompt store unreachable at subscribe; the first snapshot will be delivered in full: %s", e)
            self._known = None
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it (bounded: the backend calls it makes are themselves time-limited)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- to implement -------------------------------------------------------------------------------
    def _wait(self, timeout: float) -> tuple[list[ChangeEvent], bool]:
        """Block up to ``timeout`` s; return (pushed events, whether a snapshot diff should run now)."""
        raise NotImplementedError

    def _snapshot(self) -> Snapshot:
        raise NotImplementedError

    def _reset(self) -> None:
        """Drop connections after an error (the next ``_wait`` reconnects) and when the thread ends."""

    # -- loop ---------------------------------------------------------------------------------------
    def _emit(self, events: list[ChangeEvent]) -> None:
        for ev in events:
            if self._stop.is_set():
                return
            try:
                self._callback(ev)
            except Exception:
                # A buggy callback must not stop notifications for every other task.
                log.exception("prompt store change callback failed for %s/%s", ev.tenant, ev.task)

    def _reconcile(self) -> None:
        snap = self._snapshot()
        old = self._known if self._known is not None else {}
        self._known = snap
        self._emit(diff_snapshots(old, snap))

    def _apply_pushed(self, events: list[ChangeEvent]) -> None:
        fresh = []
        for ev in events:
            if self._known is not None:
                key = (ev.tenant, ev.task)
                if ev.revision <= self._known.get(key, unknown_state(*key)).revision:
                    continue  # delivered already (e.g. by a reconcile that ran first), or older than that
                self._known[key] = ev
            fresh.append(ev)
        self._emit(fresh)

    def _run(self) -> None:
        next_reconcile = 0.0 if self._known is None else time.monotonic() + self._reconcile_s
        backoff = 0.05
        failing_since: float | None = None
        try:
            self._loop(next_reconcile, backoff, failing_since)
        finally:
            self._reset()

    def _loop(self, next_reconcile: float, backoff: float, failing_since: float | None) -> None:
        while not self._stop.is_set():
            try:
                timeout = max(0.0, min(0.25, next_reconcile - time.monotonic()))
                pushed, due = self._wait(timeout)
                if self._stop.is_set():
                    break
                self._apply_pushed(pushed)
                if due or time.monotonic() >= next_reconcile:
                    self._reconcile()
                    next_reconcile = time.monotonic() + self._reconcile_s
                if failing_since is not None:
                    log.warning("prompt store watcher recovered after %.1f s", time.monotonic() - failing_since)
                    failing_since = None
                backoff = 0.05
            except Exception as e:  # the watcher must outlive any backend failure
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("prompt store watcher error (will retry): %s", e)
                else:
                    log.debug("prompt store watcher still failing: %s", e)
                self._reset()
                # Reconcile first thing after recovery: pushed messages sent while we were away are lost.
                next_reconcile = 0.0
                self._stop.wait(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
