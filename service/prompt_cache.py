"""Device-resident prompt sets handed out as leases, with one load per missing set however many wait for it.

``await cache.lease(key, deadline)`` gives a request the exact version its ``SetKey`` names (tenant,
task, version and sha256). A hit leases the resident entry (``resident.py``); a miss joins the one load of that
key in flight, and the load hands a lease to every request waiting on it, so no request can lose its set to
eviction between load and use. Entries are immutable, so a batch always runs the bytes it started with.

Which version a task should serve is not this module's business (``prompt_sets.py`` decides and passes keys
in). Its one question back is ``admit``: asked under the cache's lock as a load finishes, so that a set whose
task was deleted while it loaded never becomes resident.

Concurrency: one lock guards the flights; store reads, validation and device copies run on a small loader pool
outside it. Lock order: this cache's lock, then the table's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lpt.backbone import BackboneInfo
from lpt.errors import NotFound, StoreCorrupt, StoreUnavailable, TooLarge
from lpt.prompt_set import PromptSet, ValidationLimits, decode, load_and_validate
from prompts_store.base import PromptStore, StoredBlob, StoredVersion
from service.errors import DeadlineExceeded, SetChanged
from service.metrics import ServiceMetrics
from service.resident import Lease, ResidentSet, ResidentTable, SetKey, make_resident

log = logging.getLogger(__name__)
# The key of a set prepared before it is stored: replaced by its real one on install.
_PROVISIONAL = StoredVersion("", "", 0, "", 0, 0.0)


@dataclass(eq=False)
class _Flight:
    """One load in progress; every caller that joined it gets one of the leases it resolves to."""

    future: Future[list[Lease]] = field(default_factory=Future)
    waiters: int = 0

    def take(self) -> Lease:
        return self.future.result().pop()  # list.pop is atomic: each waiter takes a distinct lease

    def abandon(self) -> None:
        """A waiter gave up: release its lease whenever the load delivers one."""

        def release_one(future: Future[list[Lease]]) -> None:
            if not future.cancelled() and future.exception() is None:
                future.result().pop().release()

        self.future.add_done_callback(release_one)


class PromptCache:
    """Resident prompt sets for every tenant, under one byte budget.

    Args:
        store: where sets are loaded from on a miss.
        backbone: what every set is validated against.
        device: where resident tensors live.
        dtype: compute dtype of resident tensors.
        budget_bytes: the table evicts unleased sets beyond this many device bytes.
        metrics: counters and gauges to update.
        limits: prompt-set validation limits.
        loaders: threads for store reads and device copies.
        model: the backbone; given, each set's shared-prompt keys/values are computed once as it becomes
            resident (and counted in the budget) instead of in every forward.
        admit: asked as a loaded set is about to become resident; False fails the load with NotFound (its task
            was deleted meanwhile). Default: every set is admitted.
    """

    def __init__(
        self,
        store: PromptStore,
        backbone: BackboneInfo,
        device: torch.device | str,
        dtype: torch.dtype,
        budget_bytes: int,
        metrics: ServiceMetrics,
        limits: ValidationLimits | None = None,
        loaders: int = 4,
        model: torch.nn.Module | None = None,
        admit: Callable[[SetKey], bool] | None = None,
    ):
        self.store = store
        self.backbone = backbone
        self.device = device
        self.dtype = dtype
        self.metrics = metrics
        self.limits = limits or ValidationLimits()
        self.model = model
        self.admit = admit or (lambda _key: True)
        self.table = ResidentTable(budget_bytes, metrics)
        self._lock = threading.Lock()
        self._inflight: dict[SetKey, _Flight] = {}
        self._pool = ThreadPoolExecutor(max_workers=loaders, thread_name_prefix="lpt-load")

    # -- leases ----------------------------------------------------------------------------------
    async def lease(self, key: SetKey, deadline: float | None = None) -> Lease:
        """A lease on the set ``key`` names; the caller releases it (``with lease:``).

        Args:
            key: the exact version (and bytes) wanted.
            deadline: ``time.monotonic()`` by which a load must finish (DeadlineExceeded after it).
        """
        found = self._lease_or_join(key)
        if isinstance(found, Lease):
            return found
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:  # a failed load raises its own error here, and hands out no leases
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(found.future)), timeout)
        except TimeoutError as exc:
            found.abandon()
            raise DeadlineExceeded("loading the prompt set took longer than the deadline") from exc
        except asyncio.CancelledError:
            found.abandon()
            raise
        return self._take(found)

    def acquire(self, key: SetKey, timeout: float | None = None) -> Lease:
        """Blocking form of ``lease`` for threads (benchmarks, tests): the caller releases the lease."""
        found = self._lease_or_join(key)
        if isinstance(found, Lease):
            return found
        try:
            found.future.result(timeout)
        except TimeoutError:
            found.abandon()
            raise
        return self._take(found)

    def prefetch(self, key: SetKey) -> None:
        """Start loading ``key`` unless it is resident or already loading; nobody waits for it."""
        with self._lock:
            if key in self.table or key in self._inflight:
                return
            self._start_flight_locked(key)

    def _take(self, flight: _Flight) -> Lease:
        """This caller's lease from a finished flight: a set served from the device cache, like a hit."""
        lease = flight.take()
        self.metrics.cache_hits.inc()
        return lease

    def _lease_or_join(self, key: SetKey) -> Lease | _Flight:
        """A lease on the resident entry, or the (single-flight) load the caller has joined."""
        with self._lock:
            lease = self.table.lease(key)
            if lease is not None:
                self.metrics.cache_hits.inc()
                return lease
            flight = self._inflight.get(key) or self._start_flight_locked(key)
            flight.waiters += 1
            return flight

    def _start_flight_locked(self, key: SetKey) -> _Flight:
        flight = self._inflight[key] = _Flight()
        self.metrics.cache_misses.inc()  # one per store read; each lease it hands out counts a hit
        try:
            self._pool.submit(self._run_flight, key, flight)
        except RuntimeError:  # the pool shut down: the service is stopping
            del self._inflight[key]
            flight.future.set_exception(StoreUnavailable(message="the service is shutting down"))
        return flight

    # -- loading ---------------------------------------------------------------------------------
    def _run_flight(self, key: SetKey, flight: _Flight) -> None:
        try:
            built = self._load(key)
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            flight.future.set_exception(exc)
            if flight.waiters == 0:
                log.info("prefetch of %s/%s v%d failed: %s", key.tenant, key.task, key.version, exc)
            return
        with self._lock:
            self._inflight.pop(key, None)  # from here on no one joins: the waiter count is final
            if not self.admit(key):
                flight.future.set_exception(NotFound(message=f"task {key.task!r} was deleted while it loaded"))
                return
            _, leases = self.table.insert(built, leases=flight.waiters)
        flight.future.set_result(leases)

    def _load(self, key: SetKey) -> ResidentSet:
        """Store read, identity check, validation and device copy: an entry not yet in the table."""
        started = time.perf_counter()
        blob = self._get(key.tenant, key.task, key.version)
        if blob.info.sha256 != key.sha256:
            raise SetChanged(f"version {key.version} of task {key.task!r} holds other bytes than expected")
        entry = self._make_entry(blob.info, load_and_validate(blob.data, self.backbone, self.limits))
        self.metrics.load_duration.observe(time.perf_counter() - started)
        return entry

    def _get(self, tenant: str, task: str, version: int | None) -> StoredBlob:
        try:
            return self.store.get(tenant, task, version)
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            raise
        except StoreCorrupt:
            self.metrics.store_corrupt.inc()
            raise

    def _make_entry(self, info: StoredVersion, ps: PromptSet) -> ResidentSet:
        """The device copy of a validated set: the one place a resident entry is built."""
        return make_resident(info, ps, self.device, self.dtype, self.model)

    def prepare(self, ps: PromptSet) -> ResidentSet:
        """The device copy of a validated set before it is stored (its key is provisional until ``install``).

        Raises:
            TooLarge: the set would take more device bytes than the whole cache budget (it could never stay
                resident: every request would load it again).
        """
        entry = self._make_entry(_PROVISIONAL, ps)
        if entry.nbytes > self.table.budget_bytes:
            raise TooLarge(
                message=f"the prompt set takes {entry.nbytes} bytes on the device; the cache budget is "
                f"{self.table.budget_bytes} bytes (--cache-bytes)",
                field="body",
            )
        return entry

    def install(self, info: StoredVersion, prepared: ResidentSet) -> ResidentSet | None:
        """Make a just-stored version resident from its ``prepare``d copy; None when ``admit`` refuses it.

        An identical re-upload names a version that may already be resident (and leased): that entry stays.
        """
        key = SetKey(info.tenant, info.task, info.version, info.sha256)
        entry = dataclasses.replace(prepared, key=key, info=info)
        with self._lock:
            if not self.admit(entry.key):
                return None
            resident, _ = self.table.insert(entry)
        return resident

    def class_names(self, key: SetKey) -> list[str]:
        """A version's class names (``described``)."""
        return list(self.described(key).class_names)

    def described(self, key: SetKey) -> PromptSet:
        """A version's prompt set for its metadata: the resident entry's, else parsed from the store's bytes on the
        CPU (a metadata read never makes a set resident)."""
        entry = self.table.peek(key)
        if entry is not None:
            return entry.prompt_set
        return decode(self._get(key.tenant, key.task, key.version).data)

    def discard_task(self, tenant: str, task: str) -> None:
        """Forget a task's versions now; leased ones free their memory once their batch ends. A load in flight
        asks ``admit`` before it inserts, under the same lock, so it cannot slip in after this."""
        with self._lock:
            self.table.discard_task(tenant, task)

    # -- introspection ---------------------------------------------------------------------------
    def resident_keys(self, tenant: str, task: str) -> list[SetKey]:
        return [k for k in self.table.in_lru_order() if k.tenant == tenant and k.task == task]

    @property
    def resident_bytes(self) -> int:
        return self.table.nbytes

    def __len__(self) -> int:
        return len(self.table)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
