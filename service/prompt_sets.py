"""The prompt-set lifecycle on one replica, and which set each request runs with.

``PromptSets`` is the one object the front ends call for prompt sets: upload, activate, delete, list and show
go to the store and write through to the device cache; ``lease`` hands a request the set it runs with. It
follows the store: every state the store reports (change events, reconcile snapshots, this replica's own writes,
the reads it makes on a miss) goes through ``TaskStates``, which keeps the newest revision of each task, so a
replica never acts on an older state than one it has seen, whatever order they arrive in.

What a replica serves, and when (docs/store.md states the contract):
- a request for the active version runs the version of the newest state known here. A new state takes effect
  here as soon as it is known: pushed events arrive within milliseconds, a missed one within ``reconcile_s``.
  The first request after a change waits for the new set to load (a task in use is prefetched) rather than be
  answered with a version the store no longer holds active;
- a resident set is identified by its sha256 as well as its version, so a version number the store reissues
  after losing data never answers with the lost bytes;
- a deleted task answers 404 from the moment its tombstone is known, and a load that finishes after that
  installs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from lpt.backbone import BackboneInfo
from lpt.errors import NotFound, StoreUnavailable, TooLarge
from lpt.prompt_set import DEFAULT_TEMPERATURE, PromptSet, ValidationLimits, load_and_validate
from prompts_store.base import PromptStore, StoredVersion, Subscription, TaskState
from service.errors import QueueFull, SetChanged
from service.metrics import ServiceMetrics
from service.prompt_cache import PromptCache
from service.resident import Lease, SetKey
from service.task_states import TaskStates

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Uploaded:
    """A stored upload: its version (``stored.new`` False when the bytes equal the active version) and the set."""

    stored: StoredVersion
    prompt_set: PromptSet


@dataclass(frozen=True)
class TaskSummary:
    """One task of a tenant's list: its active version and the class count recorded when that version was stored
    (None where the record lacks it: a store written by another tool)."""

    task: str
    active_version: int
    num_classes: int | None


@dataclass(frozen=True)
class TaskDetail:
    """The active version's class names and score temperature (scores are ``softmax(logits / T)``), and every
    version."""

    task: str
    active_version: int
    class_names: list[str]
    versions: list[StoredVersion]
    temperature: float = DEFAULT_TEMPERATURE


def state_of(info: StoredVersion) -> TaskState:
    """The task state a write's answer describes: ``info`` active at ``info.revision``."""
    return TaskState(info.tenant, info.task, info.revision, info.version, info.sha256)


class PromptSets:
    """Prompt sets as the front ends see them. Lifecycle methods block (call them from a thread).

    Args:
        store: the shared store.
        backbone: what uploads are validated against.
        limits: prompt-set validation limits.
        max_bytes: largest upload.
        metrics: store error counters.
        cache_factory: builds the device cache given its ``admit`` hook (the cache asks it before a loaded
            set becomes resident).
        max_uploads: uploads read and stored at once at most.
    """

    def __init__(
        self,
        store: PromptStore,
        backbone: BackboneInfo,
        limits: ValidationLimits,
        max_bytes: int,
        metrics: ServiceMetrics,
        cache_factory: Callable[[Callable[[SetKey], bool]], PromptCache],
        max_uploads: int,
    ):
        self.store = store
        self.backbone = backbone
        self.limits = limits
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.states = TaskStates()
        self.cache = cache_factory(self._admit)
        self._subscription: Subscription | None = None
        self.max_uploads = max_uploads
        self._uploads = 0
        self._uploads_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def upload_slot(self) -> Iterator[None]:
        """One of ``max_uploads`` places for an upload being read and stored; none free: QueueFull (429) at once,
        before the body is read (each upload holds up to ``max_bytes`` in memory)."""
        with self._uploads_lock:
            if self._uploads >= self.max_uploads:
                raise QueueFull(f"{self._uploads} uploads are in progress; retry shortly")
            self._uploads += 1
        try:
            yield
        finally:
            with self._uploads_lock:
                self._uploads -= 1

    def upload(self, tenant: str, task: str, data: bytes) -> Uploaded:
        """Validate, store and make active; the set is resident here at once (write-through)."""
        if len(data) > self.max_bytes:
            raise TooLarge(
                message=f"prompt set of {len(data)} bytes exceeds the limit of {self.max_bytes}", field="body"
            )
        ps = load_and_validate(data, self.backbone, self.limits)
        prepared = self.cache.prepare(ps)  # refused before anything is stored when it could never stay resident
        meta = {"num_classes": str(ps.num_classes), "num_params": str(ps.num_params)}
        stored = self._store(self.store.put, tenant, task, data, meta)
        self.states.apply(state_of(stored))  # before install: admission asks the newest state
        self.cache.install(stored, prepared)
        return Uploaded(stored, ps)

    def activate(self, tenant: str, task: str, version: int) -> StoredVersion:
        """Make a stored version active; on return it serves here (unless loading it failed: then it loads on
        the next request, and the failure is logged)."""
        info = self._store(self.store.activate, tenant, task, version)
        self.follow(state_of(info))
        key = self._active_key(tenant, task)
        if key is not None:
            try:
                self.cache.acquire(key).release()
            except Exception as exc:  # the store holds the activation; serving it can wait for a request
                log.warning("v%d of %s/%s is active but did not load here yet: %s", version, tenant, task, exc)
        return info

    def delete(self, tenant: str, task: str) -> None:
        """Delete a task and every version; this replica answers 404 for it from now on."""
        self._store(self.store.delete, tenant, task)
        self.follow(self._store(self.store.state, tenant, task))

    def list(self, tenant: str) -> list[TaskSummary]:
        """The tenant's tasks with their active versions (a task deleted while the list is read is left out)."""
        out = []
        for task in self._store(self.store.list_tasks, tenant):
            try:
                info = self._store(self.store.active_version, tenant, task)
            except NotFound:  # deleted between list and read
                continue
            out.append(TaskSummary(task, info.version, meta_int(info, "num_classes")))
        return out

    def show(self, tenant: str, task: str) -> TaskDetail:
        """The active version's class names and temperature (metadata only: nothing becomes resident) and every
        version."""
        active = self._store(self.store.active_version, tenant, task)
        versions = self._store(self.store.list_versions, tenant, task)
        described = self.cache.described(SetKey(tenant, task, active.version, active.sha256))
        return TaskDetail(task, active.version, list(described.class_names), versions, described.score_temperature)

    # -- following the store ----------------------------------------------------------------------
    def subscribe(self, reconcile_s: float) -> None:
        """Follow the store's change events (and its reconcile snapshots every ``reconcile_s``)."""
        self._subscription = self.store.subscribe(self.follow, reconcile_s)

    def follow(self, state: TaskState) -> None:
        """Adopt a state the store reported unless a newer one is known; drop a deleted task's sets, and start
        loading the new active set of a task that has sets resident (so its next request finds it loaded)."""
        if not (self.states.apply(state) or self._adopt_regression(state)):
            return
        key = self._active_key(state.tenant, state.task)
        if key is None:
            self.cache.discard_task(state.tenant, state.task)
        elif self.cache.resident_keys(state.tenant, state.task):
            self.cache.prefetch(key)

    def _adopt_regression(self, state: TaskState) -> bool:
        """An event older than the state held is usually late news; but when the store itself went back (it lost
        data: a failover, an older backup imported), its reconcile snapshots report the older state. Confirmed by
        a fresh read, that state is adopted; True when it was."""
        held = self.states.get(state.tenant, state.task)
        if (
            held is None
            or state.revision >= held.revision
            or (state.active, state.sha256) == (held.active, held.sha256)
        ):
            return False
        try:
            now = self.store.state(state.tenant, state.task)
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            return False
        return now.revision < held.revision and self.states.replace(held, now)

    def _admit(self, key: SetKey) -> bool:
        """A loaded set may become resident unless its task is deleted (as far as this replica knows)."""
        return not self.states.is_deleted(key.tenant, key.task)

    # -- serving ----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(
        self, tenant: str, task: str, version: int | None, deadline: float | None = None
    ) -> AsyncIterator[Lease]:
        """A lease on the set a request runs with: the active version (``version`` None) or the named one.

        Args:
            tenant: owner.
            task: task id.
            version: a stored version, or None for the active one.
            deadline: ``time.monotonic()`` by which a load must finish.
        """
        key = self._known_key(tenant, task, version) or await asyncio.to_thread(self.resolve, tenant, task, version)
        try:
            lease = await self.cache.lease(key, deadline)
        except (SetChanged, NotFound):
            # The store cannot deliver what this replica believed (a change whose event is still on its way, or
            # data the store lost): re-read the task's state and retry once with what the store says now.
            retry = await asyncio.to_thread(self._reread, key, version)
            if retry == key:
                raise
            lease = await self.cache.lease(retry, deadline)
        with lease:
            yield lease

    def acquire(self, tenant: str, task: str, version: int | None = None, timeout: float | None = None) -> Lease:
        """Blocking form of ``lease`` for threads (benchmarks, tests): the caller releases the lease."""
        key = self._known_key(tenant, task, version) or self.resolve(tenant, task, version)
        return self.cache.acquire(key, timeout)

    def resolve(self, tenant: str, task: str, version: int | None = None) -> SetKey:
        """The key of the set a request runs with, reading the store when this replica knows too little."""
        key = self._known_key(tenant, task, version)
        if key is not None:
            return key
        if self.states.get(tenant, task) is None:
            self.follow(self._store(self.store.state, tenant, task))
        if version is None:
            return self._active_key(tenant, task) or _missing(task)
        if self.states.is_deleted(tenant, task):
            _missing(task)
        versions = self._store(self.store.list_versions, tenant, task)
        shas = {v.version: v.sha256 for v in versions}
        if versions:
            self.states.learn_versions(tenant, task, versions[0].revision, shas)
        if version not in shas:
            raise NotFound(message=f"task {task!r} has no version {version}", field="version")
        return SetKey(tenant, task, version, shas[version])

    def _known_key(self, tenant: str, task: str, version: int | None) -> SetKey | None:
        """The key from what this replica knows, without reading the store (None: it must read)."""
        if version is None:
            state = self.states.get(tenant, task)
            if state is not None and state.active is None:
                _missing(task)
            return None if state is None else self._active_key(tenant, task)
        sha = self.states.version_sha256(tenant, task, version)
        return None if sha is None else SetKey(tenant, task, version, sha)

    def _active_key(self, tenant: str, task: str) -> SetKey | None:
        state = self.states.get(tenant, task)
        if state is None or state.active is None or state.sha256 is None:
            return None
        return SetKey(tenant, task, state.active, state.sha256)

    def _reread(self, failed: SetKey, version: int | None) -> SetKey:
        """After the store failed to deliver ``failed``: adopt the store's state (over the one that failed, even
        when its revision is lower: the store lost data) and resolve again."""
        held = self.states.get(failed.tenant, failed.task)
        now = self._store(self.store.state, failed.tenant, failed.task)
        if held is not None and (held.active, held.sha256) == (failed.version, failed.sha256):
            self.states.replace(held, now)
        else:
            self.states.apply(now)
        if now.active is None:
            self.cache.discard_task(failed.tenant, failed.task)
        return self.resolve(failed.tenant, failed.task, version)

    # -- plumbing ---------------------------------------------------------------------------------
    def _store(self, fn: Callable[..., T], *args: object) -> T:
        """Call the store, counting unavailability (the error itself maps to 503)."""
        try:
            return fn(*args)
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            raise

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
        self.cache.close()


def _missing(task: str) -> NoReturn:
    raise NotFound(message=f"task {task!r} has no prompt set", field="task")


def meta_int(info: StoredVersion, name: str) -> int | None:
    """An integer the upload recorded in a version's metadata (``num_classes``, ``num_params``); None when absent
    or not an integer (a store written by another tool)."""
    try:
        return int(info.meta[name]) if name in info.meta else None
    except ValueError:
        return None
