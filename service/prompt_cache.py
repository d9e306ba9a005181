"""The prompt-set cache's policy: single-flight loads, version pointers and hot swaps, over a lease table.

One call hands a request its prompt set: ``async with cache.use(tenant, task, version) as lease``. A hit leases
the resident entry (``resident.py``); a miss joins the one load of that key in flight, and the load hands a
lease to every request waiting on it, so no request can lose its set to eviction between load and use. Entries
are immutable and keyed by version, so a batch always runs the version it started with, whatever swaps happen
meanwhile.

Concurrency: one lock guards the version pointers and the flights; store reads, decoding and device copies run
on a small loader pool outside it. Lock order: this cache's lock, then the table's.

Following the store: a change event only says that something changed. Events can arrive late and out of order
(a reconcile pass can deliver a snapshot read just before an upload), so the cache asks the store for the
active version and applies that answer, unless a newer observation of the task was applied meanwhile.
Observations are ordered by when they started: a read that starts after a write has finished sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lpt.backbone import BackboneInfo
from lpt.errors import NotFound, StoreCorrupt, StoreUnavailable
from lpt.prompt_set import PromptSet, ValidationLimits, decode, load_and_validate
from prompts_store.base import ChangeEvent, PromptStore, StoredBlob, StoredVersion
from service.errors import DeadlineExceeded
from service.metrics import ServiceMetrics
from service.resident import Lease, ResidentSet, ResidentTable, SetKey, make_resident

log = logging.getLogger(__name__)

SWAP_RETRY_MAX_S = 5.0  # longest wait between retries of a failed hot swap
FlightKey = tuple[str, str, int | None]  # (tenant, task, version or None for "the active one")


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
    ):
        self.store = store
        self.backbone = backbone
        self.device = device
        self.dtype = dtype
        self.metrics = metrics
        self.limits = limits or ValidationLimits()
        self.model = model
        self.table = ResidentTable(budget_bytes, metrics)
        self._lock = threading.Lock()
        self._active: dict[tuple[str, str], int] = {}
        self._wanted: dict[tuple[str, str], int | None] = {}
        self._inflight: dict[FlightKey, _Flight] = {}
        self._observations = itertools.count(1)  # orders what the cache learns of each task's active version
        self._observed: dict[tuple[str, str], int] = {}  # per task: the newest observation applied
        self._pool = ThreadPoolExecutor(max_workers=loaders, thread_name_prefix="lpt-load")
        self._closed = False

    # -- leases ----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(
        self, tenant: str, task: str, version: int | None = None, deadline: float | None = None
    ) -> AsyncIterator[Lease]:
        """A lease on the set (the active version when ``version`` is None), released on exit.

        Args:
            tenant: owner.
            task: task id.
            version: a stored version, or None for the active one.
            deadline: ``time.monotonic()`` by which a load must finish (DeadlineExceeded after it).
        """
        found = self._lease_or_join(tenant, task, version)
        if isinstance(found, _Flight):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:  # a failed load raises its own error here, and hands out no leases
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(found.future)), timeout)
            except TimeoutError as exc:
                found.abandon()
                raise DeadlineExceeded("loading the prompt set took longer than the deadline") from exc
            except asyncio.CancelledError:
                found.abandon()
                raise
            found = self._take(found)
        with found:
            yield found

    def acquire(self, tenant: str, task: str, version: int | None = None, timeout: float | None = None) -> Lease:
        """Blocking form of ``use`` for threads (benchmarks, tests): the caller releases the lease."""
        found = self._lease_or_join(tenant, task, version)
        if isinstance(found, Lease):
            return found
        try:
            found.future.result(timeout)
        except TimeoutError:
            found.abandon()
            raise
        return self._take(found)

    def _take(self, flight: _Flight) -> Lease:
        """This caller's lease from a finished flight: a set served from the device cache, like a hit."""
        lease = flight.take()
        self.metrics.cache_hits.inc()
        return lease

    def _lease_or_join(self, tenant: str, task: str, version: int | None) -> Lease | _Flight:
        """A lease on a resident entry, or the (single-flight) load the caller has joined."""
        with self._lock:
            resolved = self._active.get((tenant, task)) if version is None else version
            lease = None if resolved is None else self.table.lease(SetKey(tenant, task, resolved))
            if lease is not None:
                self.metrics.cache_hits.inc()
                return lease
            key = (tenant, task, version)
            flight = self._inflight.get(key)
            if flight is None:
                flight = self._inflight[key] = _Flight()
                self.metrics.cache_misses.inc()  # one per store read; each lease it hands out counts a hit
                self._pool.submit(self._run_flight, key, flight)
            flight.waiters += 1
            return flight

    # -- loading ---------------------------------------------------------------------------------
    def _run_flight(self, key: FlightKey, flight: _Flight) -> None:
        tenant, task, version = key
        try:
            built = self._load(tenant, task, version)
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            flight.future.set_exception(exc)
            return
        with self._lock:
            self._inflight.pop(key, None)  # from here on no one joins: the waiter count is final
            _, leases = self.table.insert(built, leases=flight.waiters)
            loaded = built.key.version
            if version is None and self._wanted.get((tenant, task), loaded) == loaded:
                self._active[(tenant, task)] = loaded
                self._wanted[(tenant, task)] = loaded
        flight.future.set_result(leases)

    def _load(self, tenant: str, task: str, version: int | None) -> ResidentSet:
        """Store read, validation and device copy: an entry not yet in the table."""
        started = time.perf_counter()
        blob = self._get(tenant, task, version)
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
        """The device copy of a validated set: the one place a resident entry (and its extras) is built."""
        return make_resident(info, ps, self.device, self.dtype, self.model)

    def install(self, info: StoredVersion, ps: PromptSet) -> ResidentSet:
        """Make a just-uploaded (already validated) version resident and active on this replica.

        An identical re-upload names a version that may already be resident (and leased): that entry stays.
        """
        entry, _ = self.table.insert(self._make_entry(info, ps))
        with self._lock:
            # Versions only grow, so a newer wanted version means a concurrent upload finished first: keep it.
            # The same version is wanted when the store's change event for this upload came first: its swap
            # may still be loading the set that is resident now.
            tk = (info.tenant, info.task)
            wanted = self._wanted.get(tk)
            if wanted is None or info.version >= wanted:
                self._wanted[tk] = self._active[tk] = info.version
                self._observed[tk] = next(self._observations)  # the upload's write has finished
        return entry

    def class_names(self, tenant: str, task: str, version: int) -> list[str]:
        """A version's class names: from its resident entry, else parsed from the store's bytes on the CPU
        (a metadata read never makes a set resident)."""
        entry = self.table.peek(SetKey(tenant, task, version))
        if entry is not None:
            return list(entry.prompt_set.class_names)
        return list(decode(self._get(tenant, task, version).data).class_names)

    def drop_task(self, tenant: str, task: str) -> None:
        """Forget a deleted task: its versions leave the table now, leased ones free once their batch ends."""
        with self._lock:
            self._active.pop((tenant, task), None)
            self._wanted.pop((tenant, task), None)
            self._observed.pop((tenant, task), None)
            self.table.discard_task(tenant, task)

    # -- hot swap --------------------------------------------------------------------------------
    def on_change(self, event: ChangeEvent) -> None:
        """Store notification: confirm the task's active version with the store, load it, then swap atomically;
        drop deleted tasks.

        Only tasks this replica has served are followed (the others load on first use). A failed load
        leaves the old version serving and is retried with backoff while that version is still wanted (the
        store's watcher delivers each change once, so nothing else would bring it in).
        """
        tk = (event.tenant, event.task)
        with self._lock:
            if tk not in self._active or event.active == self._active[tk] == self._wanted.get(tk):
                return
        with contextlib.suppress(RuntimeError):  # the pool shut down meanwhile
            self._pool.submit(self._follow, event)

    def _follow(self, event: ChangeEvent) -> None:
        """Read the store's active version and act on it (on the event itself when the store cannot answer)."""
        with self._lock:
            observation = next(self._observations)
        try:
            active: int | None = self.store.active_version(event.tenant, event.task).version
        except NotFound:
            active = None
        except StoreUnavailable as exc:  # the event is the best knowledge there is until the store answers
            self.metrics.store_errors.inc()
            log.debug("confirming %s/%s v%s with the store failed: %s", event.tenant, event.task, event.active, exc)
            active = event.active
        except Exception:
            log.exception("confirming %s/%s v%s with the store failed", event.tenant, event.task, event.active)
            active = event.active
        self._observe(event.tenant, event.task, observation, active)

    def _observe(self, tenant: str, task: str, observation: int, active: int | None) -> None:
        """Apply what the store said of a followed task, unless a newer observation was applied first."""
        tk = (tenant, task)
        with self._lock:
            if tk not in self._active or observation <= self._observed.get(tk, 0):
                return
            self._observed[tk] = observation
            self._wanted[tk] = active
            current = self._active[tk]
        if active is None:
            self.drop_task(tenant, task)
        elif active != current:
            self._swap(tenant, task, active)

    def activate(self, tenant: str, task: str, version: int) -> None:
        """Local rollback (the store's activation has finished): follow the new active version now (blocking
        until resident)."""
        with self._lock:
            self._wanted[(tenant, task)] = version
            self._observed[(tenant, task)] = next(self._observations)
        self._swap(tenant, task, version)

    def _swap(self, tenant: str, task: str, version: int, attempt: int = 0) -> None:
        try:
            if SetKey(tenant, task, version) not in self.table:
                self.table.insert(self._load(tenant, task, version))
        except Exception as exc:
            if attempt == 0:
                log.warning(
                    "hot swap of %s/%s to v%d failed, old version keeps serving (will retry): %s",
                    tenant, task, version, exc,
                )  # fmt: skip
            self._retry_swap(tenant, task, version, attempt + 1)
            return
        with self._lock:
            if self._wanted.get((tenant, task)) == version:
                self._active[(tenant, task)] = version

    def _still_wanted(self, tenant: str, task: str, version: int) -> bool:
        with self._lock:
            return not self._closed and self._wanted.get((tenant, task)) == version

    def _retry_swap(self, tenant: str, task: str, version: int, attempt: int) -> None:
        """Try a failed swap again after a backoff (0.2 s doubling to 5 s) unless superseded or closed."""
        if not self._still_wanted(tenant, task, version):
            return
        timer = threading.Timer(
            min(SWAP_RETRY_MAX_S, 0.1 * 2**attempt), self._resubmit_swap, (tenant, task, version, attempt)
        )
        timer.daemon = True
        timer.start()

    def _resubmit_swap(self, tenant: str, task: str, version: int, attempt: int) -> None:
        if self._still_wanted(tenant, task, version):
            with contextlib.suppress(RuntimeError):  # the pool shut down meanwhile
                self._pool.submit(self._swap, tenant, task, version, attempt)

    # -- introspection ---------------------------------------------------------------------------
    def active_version(self, tenant: str, task: str) -> int | None:
        with self._lock:
            return self._active.get((tenant, task))

    @property
    def resident_bytes(self) -> int:
        return self.table.nbytes

    def __len__(self) -> int:
        return len(self.table)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
