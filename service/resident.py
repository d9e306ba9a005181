"""Device-resident prompt sets under one byte budget, handed out as releasable leases.

``ResidentTable`` is a small LRU of immutable ``ResidentSet`` entries keyed by ``SetKey``. A ``Lease`` keeps
its entry from eviction until released; the LRU reclaims only unleased entries, oldest first, whenever the
table is over budget. Inserting a key that is already resident returns (and leases) the entry that is there:
an entry is never replaced while it may be in use, so every lease counts against the entry it refers to
(vLLM's LoRA manager treats a re-add the same way). Loading, versions and hot swaps live one level up, in
``prompt_cache.py``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lpt.forward import PromptBank, SharedKV, precompute_shared_kv
from lpt.prompt_set import PromptSet
from prompts_store.base import StoredVersion
from service.metrics import ServiceMetrics


class SetKey(NamedTuple):
    """One immutable prompt-set version of one tenant's task, named by its number and its bytes' sha256.

    The sha256 is part of the identity so that a version number the store reissues after losing data (a Redis
    failover, an older backup imported) can never be answered with the lost version's bytes.
    """

    tenant: str
    task: str
    version: int
    sha256: str


@dataclass(eq=False)
class ResidentSet:
    """One prompt-set version on the device, immutable once inserted.

    Attributes:
        key: which version this is.
        info: its store metadata.
        prompt_set: the set's tensors, on the device in the compute dtype.
        bank: a one-slot bank of views over ``prompt_set`` (no extra memory).
        shared_kv: the shared prompt's attention keys/values in every block, computed once when the set becomes
            resident (``None``: computed per forward); counted in ``nbytes``.
    """

    key: SetKey
    info: StoredVersion
    prompt_set: PromptSet
    bank: PromptBank
    shared_kv: SharedKV | None = None

    @property
    def geometry(self) -> tuple[int, int]:
        return self.bank.geometry

    @property
    def nbytes(self) -> int:
        """Device bytes this entry owns: the set's tensors and its shared keys/values (the bank's views over
        them are not counted twice)."""
        kv = self.shared_kv.nbytes if self.shared_kv is not None else 0
        return sum(t.numel() * t.element_size() for t in self.prompt_set.tensors().values()) + kv


def to_device(ps: PromptSet, device: torch.device | str, dtype: torch.dtype) -> PromptSet:
    """A copy of ``ps`` with every tensor on ``device`` in ``dtype`` (contiguous)."""

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype).contiguous()

    return dataclasses.replace(
        ps,
        shared_prompt=move(ps.shared_prompt),
        head_weight=move(ps.head_weight),
        group_prompts=move(ps.group_prompts),
        group_keys=move(ps.group_keys),
    )


def single_bank(ps: PromptSet, shared_kv: SharedKV | None = None) -> PromptBank:
    """A one-slot bank of views over the set's own tensors (and its shared keys/values): no extra device memory."""
    return PromptBank.from_tensors(
        ps.shared_prompt, ps.head_weight, ps.share_blocks, ps.group_prompts, ps.group_keys, ps.top_k, ps.head_scale,
        shared_kv,
    )  # fmt: skip


def make_resident(
    info: StoredVersion,
    ps: PromptSet,
    device: torch.device | str,
    dtype: torch.dtype,
    model: torch.nn.Module | None = None,
) -> ResidentSet:
    """The resident entry of a validated set: its device copy, its shared keys/values and a one-slot bank.

    Args:
        info: the version's store metadata (names the key).
        ps: the validated set (any device and dtype).
        device: where the entry's tensors live.
        dtype: their compute dtype.
        model: the backbone the shared keys/values are computed with, once, here; ``None``: per forward.
    """
    moved = to_device(ps, device, dtype)
    kv = None
    if model is not None:
        with torch.inference_mode():
            kv = precompute_shared_kv(model, moved)
    key = SetKey(info.tenant, info.task, info.version, info.sha256)
    return ResidentSet(key, info, moved, single_bank(moved, kv), shared_kv=kv)


class Lease:
    """A hold on one resident entry: while any lease on an entry is open, the table does not evict it.

    ``release`` is idempotent, so a lease can be released from every way its holder can finish.
    """

    __slots__ = ("_open", "_table", "entry")

    def __init__(self, table: ResidentTable, entry: ResidentSet):
        self._table = table
        self.entry = entry
        self._open = True

    @property
    def key(self) -> SetKey:
        return self.entry.key

    def share(self) -> Lease:
        """Another lease on the same entry (e.g. one per queued image), released on its own."""
        return self._table.add_lease(self.entry)

    def release(self) -> None:
        self._table.release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


@dataclass(eq=False)
class _Slot:
    entry: ResidentSet
    nbytes: int  # as counted when inserted, so the total stays consistent whatever the entry later holds
    leases: int = 0


class ResidentTable:
    """A budgeted LRU of resident entries with leases. Thread-safe.

    The budget can be exceeded only by leased entries (and by one fresh insert that alone is larger); the
    next release or insert evicts back down to it.

    Args:
        budget_bytes: device bytes the unleased entries may fill.
        metrics: eviction counter and the resident gauges to keep current.
    """

    def __init__(self, budget_bytes: int, metrics: ServiceMetrics):
        self.budget_bytes = budget_bytes
        self.metrics = metrics
        self._lock = threading.Lock()
        self._slots: OrderedDict[SetKey, _Slot] = OrderedDict()
        self._bytes = 0

    def lease(self, key: SetKey) -> Lease | None:
        """A lease on the resident entry of ``key`` (now the most recently used), or None if not resident."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return None
            slot.leases += 1
            self._slots.move_to_end(key)
            return Lease(self, slot.entry)

    def peek(self, key: SetKey) -> ResidentSet | None:
        """The resident entry of ``key`` without leasing or touching it (for metadata reads)."""
        with self._lock:
            slot = self._slots.get(key)
            return None if slot is None else slot.entry

    def insert(self, entry: ResidentSet, leases: int = 0) -> tuple[ResidentSet, list[Lease]]:
        """Make ``entry`` resident unless its key already is; returns the resident entry and ``leases`` leases.

        The entry already resident under the key wins: it is touched and leased, and ``entry`` is dropped.
        """
        with self._lock:
            slot = self._slots.get(entry.key)
            if slot is None:
                slot = self._slots[entry.key] = _Slot(entry, entry.nbytes)
                self._bytes += slot.nbytes
            else:
                self._slots.move_to_end(entry.key)
            slot.leases += leases
            self._evict_locked(keep=entry.key)
            return slot.entry, [Lease(self, slot.entry) for _ in range(leases)]

    def add_lease(self, entry: ResidentSet) -> Lease:
        """One more lease on an entry already leased by the caller."""
        with self._lock:
            slot = self._slots.get(entry.key)
            if slot is not None and slot.entry is entry:
                slot.leases += 1
            return Lease(self, entry)

    def release(self, lease: Lease) -> None:
        with self._lock:
            if not lease._open:
                return
            lease._open = False
            slot = self._slots.get(lease.entry.key)
            if slot is None or slot.entry is not lease.entry:
                return  # discarded meanwhile: its bytes already left the count
            slot.leases -= 1
            if slot.leases == 0:
                self._evict_locked()

    def discard_task(self, tenant: str, task: str) -> None:
        """Forget every version of a task now; open leases keep their tensors alive until released."""
        with self._lock:
            for key in [k for k in self._slots if k.tenant == tenant and k.task == task]:
                self._bytes -= self._slots.pop(key).nbytes
            self._update_gauges_locked()

    def leases_of(self, key: SetKey) -> int:
        """Open leases on the entry of ``key`` (0 when not resident)."""
        with self._lock:
            slot = self._slots.get(key)
            return 0 if slot is None else slot.leases

    def in_lru_order(self) -> list[SetKey]:
        """Resident keys, least recently used first."""
        with self._lock:
            return list(self._slots)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _evict_locked(self, keep: SetKey | None = None) -> None:
        for key in list(self._slots):  # least recently used first
            if self._bytes <= self.budget_bytes:
                break
            slot = self._slots[key]
            if slot.leases == 0 and key != keep:
                del self._slots[key]
                self._bytes -= slot.nbytes
                self.metrics.cache_evictions.inc()
        self._update_gauges_locked()

    def _update_gauges_locked(self) -> None:
        self.metrics.cache_resident.set(len(self._slots))
        self.metrics.cache_bytes.set(self._bytes)
