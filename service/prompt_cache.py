"""Device-resident prompt sets: LRU by bytes, pinning, single-flight loads, atomic version swaps.

Like vLLM's LoRA manager, the cache is a table of resident entries with touch/pin/evict hooks; the
engine turns the entries of one batch into a ``PromptBank`` and a per-row slot index, and one gather
inside the forward does the rest. Entries are keyed by (tenant, task, version) and are immutable, so
a batch always runs the version it started with, whatever swaps happen meanwhile.

Concurrency: one lock guards the tables; store reads, decoding and device copies run on a small
loader pool outside the lock. Concurrent lookups of the same cold key share one load (single-flight).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lpt.backbone import BackboneInfo
from lpt.errors import StoreUnavailable
from lpt.forward import PromptBank, SharedKV, precompute_shared_kv
from lpt.prompt_set import PromptSet, ValidationLimits, load_and_validate
from prompts_store.base import ChangeEvent, PromptStore, StoredVersion
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

Key = tuple[str, str, int]
SWAP_RETRY_MAX_S = 5.0  # longest wait between retries of a failed hot swap


@dataclass(eq=False)
class ResidentSet:
    """One immutable prompt-set version on the device (``nbytes`` counts its shared keys/values too)."""

    key: Key
    info: StoredVersion
    prompt_set: PromptSet
    bank: PromptBank
    nbytes: int
    pins: int = 0
    last_used: float = field(default_factory=time.monotonic)
    shared_kv: SharedKV | None = None

    @property
    def geometry(self) -> tuple[int, int]:
        return self.bank.geometry


def to_device(ps: PromptSet, device: torch.device | str, dtype: torch.dtype) -> PromptSet:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype).contiguous()

    return PromptSet(
        shared_prompt=move(ps.shared_prompt),
        head_weight=move(ps.head_weight),
        class_names=ps.class_names,
        backbone=ps.backbone,
        backbone_fingerprint=ps.backbone_fingerprint,
        share_blocks=ps.share_blocks,
        top_k=ps.top_k,
        head_scale=ps.head_scale,
        group_prompts=move(ps.group_prompts),
        group_keys=move(ps.group_keys),
        extra=ps.extra,
    )


def single_bank(ps: PromptSet, shared_kv: SharedKV | None = None) -> PromptBank:
    """A one-slot bank of views over the set's own tensors (and its shared keys/values): no extra device memory."""
    return PromptBank.from_tensors(
        ps.shared_prompt, ps.head_weight, ps.share_blocks, ps.group_prompts, ps.group_keys, ps.top_k, ps.head_scale,
        shared_kv,
    )  # fmt: skip


def make_resident(
    key: Key,
    info: StoredVersion,
    ps: PromptSet,
    device: torch.device | str,
    dtype: torch.dtype,
    model: torch.nn.Module | None = None,
) -> ResidentSet:
    """The device copy of a set, its one-slot bank and, given the backbone, its shared keys/values.

    Args:
        key: (tenant, task, version).
        info: the stored version's metadata.
        ps: the validated set (any device).
        device: where it becomes resident.
        dtype: resident dtype.
        model: the backbone the shared keys/values are computed with once here; ``None``: per forward.
    """
    moved = to_device(ps, device, dtype)
    kv = None
    if model is not None:
        with torch.inference_mode():
            kv = precompute_shared_kv(model, moved)
    nbytes = moved.nbytes + (kv.nbytes if kv is not None else 0)
    return ResidentSet(key=key, info=info, prompt_set=moved, bank=single_bank(moved, kv), nbytes=nbytes, shared_kv=kv)


class PromptCache:
    """Resident prompt sets for every tenant, under one byte budget.

    Args:
        store: where sets are loaded from on a miss.
        backbone: what every set is validated against.
        device: where resident tensors live.
        dtype: compute dtype of resident tensors.
        budget_bytes: LRU evicts unpinned sets beyond this many device bytes.
        metrics: counters and gauges to update.
        limits: prompt-set validation limits.
        loaders: threads for store reads and device copies.
        model: the backbone; given, every resident set carries its shared-prompt keys/values (counted in the
            budget) and forwards skip recomputing them.
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
        self.budget_bytes = budget_bytes
        self.metrics = metrics
        self.limits = limits or ValidationLimits()
        self.model = model
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, ResidentSet] = OrderedDict()
        self._bytes = 0
        self._active: dict[tuple[str, str], int] = {}
        self._wanted: dict[tuple[str, str], int | None] = {}
        self._inflight: dict[tuple[str, str, int | None], Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=loaders, thread_name_prefix="lpt-load")
        self._closed = False

    # -- lookups ---------------------------------------------------------------------------------
    def lookup(self, tenant: str, task: str, version: int | None = None) -> ResidentSet | Future:
        """A pinned resident entry, or a Future that completes when the (single-flight) load is done.

        Call ``release`` once per pin. After the Future completes, call ``lookup`` again.
        """
        with self._lock:
            v = self._active.get((tenant, task)) if version is None else version
            entry = self._entries.get((tenant, task, v)) if v is not None else None
            if entry is not None:
                entry.pins += 1
                entry.last_used = time.monotonic()
                self._entries.move_to_end(entry.key)
                self.metrics.cache_hits.inc()
                return entry
            flight = (tenant, task, version)
            future = self._inflight.get(flight)
            if future is None:
                future = Future()
                self._inflight[flight] = future
                self.metrics.cache_misses.inc()
                self._pool.submit(self._load_flight, flight, future)
            return future

    def acquire(self, tenant: str, task: str, version: int | None = None, attempts: int = 5) -> ResidentSet:
        """Blocking form of ``lookup`` (for threads and tests)."""
        for _ in range(attempts):
            found = self.lookup(tenant, task, version)
            if isinstance(found, ResidentSet):
                return found
            found.result()
        raise RuntimeError(f"prompt set {tenant}/{task} evicted repeatedly while loading; cache budget too small?")

    def pin(self, entry: ResidentSet, count: int = 1) -> None:
        with self._lock:
            entry.pins += count

    def release(self, entry: ResidentSet) -> None:
        with self._lock:
            entry.pins -= 1
            self._evict_locked()

    # -- loading ---------------------------------------------------------------------------------
    def _load_flight(self, flight: tuple[str, str, int | None], future: Future) -> None:
        tenant, task, version = flight
        try:
            entry = self._load(tenant, task, version)
            with self._lock:
                if version is None and self._wanted.get((tenant, task), entry.key[2]) == entry.key[2]:
                    self._active[(tenant, task)] = entry.key[2]
                    self._wanted[(tenant, task)] = entry.key[2]
            future.set_result(entry.key)
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            with self._lock:
                self._inflight.pop(flight, None)

    def _load(self, tenant: str, task: str, version: int | None) -> ResidentSet:
        started = time.perf_counter()
        try:
            blob = self.store.get(tenant, task, version)
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            raise
        ps = load_and_validate(blob.data, self.backbone, self.limits)
        entry = self._insert(blob.info, ps)
        self.metrics.load_duration.observe(time.perf_counter() - started)
        return entry

    def _insert(self, info: StoredVersion, ps: PromptSet) -> ResidentSet:
        key = (info.tenant, info.task, info.version)
        entry = make_resident(key, info, ps, self.device, self.dtype, self.model)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
                entry.pins = old.pins
            self._entries[key] = entry
            self._bytes += entry.nbytes
            self._evict_locked(keep=key)
        return entry

    def install(self, info: StoredVersion, ps: PromptSet) -> ResidentSet:
        """Make a just-uploaded (already validated) version resident and active on this replica."""
        entry = self._insert(info, ps)
        with self._lock:
            # Versions only grow, so a newer wanted version means a concurrent upload finished first: keep it.
            wanted = self._wanted.get((info.tenant, info.task))
            if wanted is None or info.version > wanted:
                self._wanted[(info.tenant, info.task)] = info.version
                self._active[(info.tenant, info.task)] = info.version
        return entry

    # -- eviction --------------------------------------------------------------------------------
    def _evict_locked(self, keep: Key | None = None) -> None:
        if self._bytes <= self.budget_bytes:
            self._update_gauges_locked()
            return
        for key in list(self._entries):  # oldest first
            if self._bytes <= self.budget_bytes:
                break
            entry = self._entries[key]
            if entry.pins > 0 or key == keep:
                continue
            del self._entries[key]
            self._bytes -= entry.nbytes
            self.metrics.cache_evictions.inc()
        self._update_gauges_locked()

    def _update_gauges_locked(self) -> None:
        self.metrics.cache_resident.set(len(self._entries))
        self.metrics.cache_bytes.set(self._bytes)

    def drop_task(self, tenant: str, task: str) -> None:
        """Forget a deleted task: unpinned versions go now, pinned ones as soon as their batch ends."""
        with self._lock:
            self._active.pop((tenant, task), None)
            self._wanted.pop((tenant, task), None)
            for key in [k for k in self._entries if k[0] == tenant and k[1] == task]:
                entry = self._entries.pop(key)
                self._bytes -= entry.nbytes
            self._update_gauges_locked()

    # -- hot swap --------------------------------------------------------------------------------
    def on_change(self, event: ChangeEvent) -> None:
        """Store notification: load the new active version, then swap atomically; drop deleted tasks.

        Only tasks this replica has served are followed (the others load on first use). A failed load
        leaves the old version serving and is retried with backoff while that version is still wanted (the
        store's watcher delivers each change once, so nothing else would bring it in).
        """
        tk = (event.tenant, event.task)
        with self._lock:
            known = tk in self._active
            current = self._active.get(tk)
            if known:
                self._wanted[tk] = event.active
        if not known or event.active == current:
            return
        if event.active is None:
            self.drop_task(*tk)
            return
        self._pool.submit(self._swap, event.tenant, event.task, event.active)

    def activate(self, tenant: str, task: str, version: int) -> None:
        """Local rollback: follow the new active version now (blocking until resident)."""
        with self._lock:
            self._wanted[(tenant, task)] = version
        self._swap(tenant, task, version)

    def _swap(self, tenant: str, task: str, version: int, attempt: int = 0) -> None:
        try:
            with self._lock:
                resident = (tenant, task, version) in self._entries
            if not resident:
                self._load(tenant, task, version)
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
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
