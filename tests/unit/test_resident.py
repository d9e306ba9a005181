"""The lease table alone: LRU by bytes, leases that block eviction, and re-insert that never replaces an entry."""

from __future__ import annotations

import dataclasses

import torch

from lpt.prompt_kv import SharedKV
from service.metrics import ServiceMetrics
from service.resident import ResidentTable, SetKey
from tests.support.resident import SET_BYTES, tiny_entry


def key(task: str) -> SetKey:
    """The key of ``tiny_entry(task)``."""
    return tiny_entry(task).key


def table(sets: float) -> ResidentTable:
    return ResidentTable(int(sets * SET_BYTES), ServiceMetrics())


def test_entry_bytes_count_every_tensor_it_owns() -> None:
    entry = tiny_entry()
    assert entry.nbytes == SET_BYTES == entry.prompt_set.nbytes
    with_kv = dataclasses.replace(entry, shared_kv=SharedKV(torch.zeros(2, 16)))  # keys/values are budgeted too
    assert with_kv.nbytes == SET_BYTES + 2 * 16 * 4


def test_lru_evicts_the_least_recently_used_unleased_entry() -> None:
    t = table(2.5)
    for task in ("a", "b"):
        t.insert(tiny_entry(task))
    assert t.lease(key("a")) is not None  # a is now the most recently used (and leased)
    t.lease(key("a")).release()
    t.insert(tiny_entry("c"))
    assert [k.task for k in t.in_lru_order()] == ["a", "c"]
    assert t.nbytes == 2 * SET_BYTES <= t.budget_bytes
    assert t.metrics.registry.get_sample_value("lpt_prompt_cache_evictions_total") == 1


def test_leased_entries_are_never_evicted_and_leave_once_released() -> None:
    t = table(1.5)
    _, (held,) = t.insert(tiny_entry("a"), leases=1)
    t.insert(tiny_entry("b"))  # over budget, but a is leased and b is the fresh insert
    t.insert(tiny_entry("c"))  # b goes; a still leased
    assert [k.task for k in t.in_lru_order()] == ["a", "c"]
    assert t.nbytes == 2 * SET_BYTES > t.budget_bytes  # only leased entries may exceed the budget
    held.release()
    assert [k.task for k in t.in_lru_order()] == ["c"] and t.nbytes <= t.budget_bytes


def test_reinsert_returns_the_resident_entry_and_its_leases_stay_true() -> None:
    t = table(1.5)
    first, (lease,) = t.insert(tiny_entry("a"), leases=1)
    again, more = t.insert(tiny_entry("a"), leases=2)  # identical re-upload, or a load racing an upload
    assert again is first and all(m.entry is first for m in more)
    assert len(t) == 1 and t.nbytes == SET_BYTES
    assert t.leases_of(first.key) == 3
    for held in (lease, *more):
        held.release()
    assert t.leases_of(first.key) == 0
    t.insert(tiny_entry("b"))
    t.insert(tiny_entry("c"))
    assert key("a") not in t  # released for real: it can be evicted


def test_release_is_idempotent_and_share_adds_a_lease() -> None:
    t = table(4)
    _, (lease,) = t.insert(tiny_entry("a"), leases=1)
    row = lease.share()
    assert t.leases_of(lease.key) == 2
    lease.release()
    lease.release()
    assert t.leases_of(lease.key) == 1
    with row:
        pass
    assert t.leases_of(lease.key) == 0


def test_discarded_entry_leases_release_without_touching_a_reloaded_one() -> None:
    t = table(4)
    old, (lease,) = t.insert(tiny_entry("a"), leases=1)
    t.discard_task("acme", "a")
    assert len(t) == 0 and t.nbytes == 0
    new, _ = t.insert(tiny_entry("a"), leases=1)
    assert new is not old
    lease.release()  # the old entry's lease: the new entry keeps its own
    assert t.leases_of(new.key) == 1
