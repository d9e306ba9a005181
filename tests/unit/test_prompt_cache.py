"""The device cache and the replica's view of the store, over a real embedded store: single-flight loads,
eviction under leases, re-insert of a resident version, deadlines while loading, sha256 identity, admission
of a load that finishes after a delete, and states applied by revision whatever order they arrive in."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from lpt.errors import NotFound
from lpt.prompt_set import ValidationLimits, decode
from prompts_store import open_store
from prompts_store.base import PromptStore, TaskState
from service.errors import DeadlineExceeded, SetChanged
from service.metrics import ServiceMetrics
from service.prompt_cache import PromptCache
from service.prompt_sets import PromptSets
from service.resident import SetKey
from tests.support.prompt_sets import prompt_bytes
from tests.support.waiting import wait_until

TENANT = "acme"


class GatedStore:
    """A real store whose ``get`` is counted and can be held at a gate."""

    def __init__(self, inner: PromptStore):
        self.inner = inner
        self.gets: Counter[int | None] = Counter()
        self.gate = threading.Event()
        self.gate.set()

    def get(self, tenant: str, task: str, version: int | None = None) -> Any:
        self.gets[version] += 1
        assert self.gate.wait(30)
        return self.inner.get(tenant, task, version)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def store(tmp_path: Path, backbone) -> GatedStore:
    inner = open_store(tmp_path / "store")
    for i, task in enumerate(("a", "b", "c", "d")):
        inner.put(TENANT, task, prompt_bytes(backbone.info, seed=i))
    return GatedStore(inner)


@pytest.fixture
def one_set(backbone) -> int:
    return decode(prompt_bytes(backbone.info)).nbytes


def make_sets(store: GatedStore, backbone, budget: int) -> PromptSets:
    metrics, limits = ServiceMetrics(), ValidationLimits()

    def cache(admit: Any) -> PromptCache:
        return PromptCache(store, backbone.info, "cpu", torch.float32, budget, metrics, limits, admit=admit)

    return PromptSets(store, backbone.info, limits, 1 << 30, metrics, cache, max_uploads=4)


def key_of(store: GatedStore, task: str) -> SetKey:
    info = store.inner.active_version(TENANT, task)
    return SetKey(TENANT, task, info.version, info.sha256)


def test_concurrent_misses_share_one_load_and_each_get_a_lease(store, backbone, one_set) -> None:
    sets = make_sets(store, backbone, 10 * one_set)
    store.gate.clear()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(sets.acquire, TENANT, "a") for _ in range(8)]
        wait_until(lambda: store.gets[1] == 1, 10, "the load to reach the store")
        store.gate.set()
        leases = [f.result(timeout=30) for f in futures]
    assert store.gets[1] == 1
    assert len({id(lease.entry) for lease in leases}) == 1
    key = leases[0].key
    assert key == key_of(store, "a") and sets.cache.table.leases_of(key) == 8
    for lease in leases:
        lease.release()
    assert sets.cache.table.leases_of(key) == 0
    m = sets.metrics.registry
    assert m.get_sample_value("lpt_prompt_cache_misses_total") == 1
    assert m.get_sample_value("lpt_prompt_cache_hits_total") == 8  # every lease handed out
    sets.close()


def test_async_lease_waits_on_the_flight_and_releases_on_exit(store, backbone, one_set) -> None:
    sets = make_sets(store, backbone, 10 * one_set)

    async def run() -> list[int]:
        async def one() -> int:
            async with sets.lease(TENANT, "b", None) as lease:
                assert sets.cache.table.leases_of(lease.key) >= 1
                await asyncio.sleep(0.01)
                return lease.key.version

        return await asyncio.gather(*(one() for _ in range(20)))

    assert asyncio.run(run()) == [1] * 20
    assert store.gets[1] == 1 and sets.cache.table.leases_of(key_of(store, "b")) == 0
    sets.close()


def test_a_caller_past_its_deadline_gives_up_and_its_lease_is_returned(store, backbone, one_set) -> None:
    sets = make_sets(store, backbone, 10 * one_set)
    store.gate.clear()

    async def late() -> None:
        async with sets.lease(TENANT, "c", None, deadline=time.monotonic() + 0.1):
            pass

    with pytest.raises(DeadlineExceeded):
        asyncio.run(late())
    store.gate.set()
    key = key_of(store, "c")
    wait_until(lambda: key in sets.cache.table, 10, "the abandoned load to finish")
    assert sets.cache.table.leases_of(key) == 0  # loaded, and the abandoned lease released
    sets.close()


def test_eviction_spares_leased_sets_and_the_budget_holds_once_released(store, backbone, one_set) -> None:
    sets = make_sets(store, backbone, int(2.5 * one_set))
    held = sets.acquire(TENANT, "a")
    for task in ("b", "c", "d"):
        sets.acquire(TENANT, task).release()
    table = sets.cache.table
    resident = {k.task for k in table.in_lru_order()}
    assert "a" in resident and len(resident) == 2  # a is leased: the oldest unleased went instead
    assert table.nbytes <= table.budget_bytes
    held.release()
    sets.acquire(TENANT, "b").release()
    assert table.nbytes <= table.budget_bytes and "a" not in {k.task for k in table.in_lru_order()}
    sets.close()


def test_an_identical_reupload_keeps_the_leased_entry_and_the_lease_can_free_it(store, backbone, one_set) -> None:
    """Re-installing a resident, leased version must not replace the entry (its leases count against it)."""
    sets = make_sets(store, backbone, int(1.5 * one_set))
    lease = sets.acquire(TENANT, "a")
    again = sets.upload(TENANT, "a", store.inner.get(TENANT, "a").data)
    assert not again.stored.new
    assert sets.cache.table.peek(lease.key) is lease.entry and len(sets.cache) == 1
    lease.release()
    sets.acquire(TENANT, "b").release()
    sets.acquire(TENANT, "c").release()
    assert lease.key not in sets.cache.table and len(sets.cache) == 1
    sets.close()


def test_a_pinned_version_and_the_active_one_share_the_entry(store, backbone, one_set) -> None:
    sets = make_sets(store, backbone, 10 * one_set)
    with sets.acquire(TENANT, "a", version=1) as by_number, sets.acquire(TENANT, "a") as active:
        assert active.entry is by_number.entry
        assert sets.cache.table.leases_of(by_number.key) == 2
    assert sets.cache.table.leases_of(by_number.key) == 0
    with pytest.raises(NotFound):
        sets.acquire(TENANT, "a", version=9)
    sets.close()


def test_a_load_whose_bytes_differ_from_the_expected_sha256_is_refused(store, backbone, one_set) -> None:
    sets = make_sets(store, backbone, 10 * one_set)
    wrong = key_of(store, "a")._replace(sha256="0" * 64)
    with pytest.raises(SetChanged):
        sets.cache.acquire(wrong)
    assert len(sets.cache) == 0
    sets.close()


def test_a_load_that_finishes_after_a_delete_installs_nothing(store, backbone, one_set) -> None:
    sets = make_sets(store, backbone, 10 * one_set)
    key = sets.resolve(TENANT, "a")
    store.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(sets.acquire, TENANT, "a")
        wait_until(lambda: store.gets[1] == 1, 10, "the load to reach the store")
        sets.delete(TENANT, "a")
        store.gate.set()
        with pytest.raises(NotFound):
            waiting.result(30)
    assert key not in sets.cache.table
    with pytest.raises(NotFound):
        sets.acquire(TENANT, "a")
    sets.close()


def test_states_apply_by_revision_whatever_order_they_arrive_in(store, backbone, one_set) -> None:
    """A rollback's state overtaking the upload's: the older one, arriving last, changes nothing."""
    sets = make_sets(store, backbone, 10 * one_set)
    v1 = key_of(store, "a")
    sets.acquire(TENANT, "a").release()
    uploaded = store.inner.put(TENANT, "a", prompt_bytes(backbone.info, seed=7))
    rolled_back = store.inner.activate(TENANT, "a", 1)
    assert rolled_back.revision > uploaded.revision
    sets.follow(TaskState(TENANT, "a", rolled_back.revision, 1, v1.sha256))
    sets.follow(TaskState(TENANT, "a", uploaded.revision, uploaded.version, uploaded.sha256))  # late
    assert sets.resolve(TENANT, "a") == v1
    sets.follow(store.inner.state(TENANT, "a"))  # a repeat of the newest: nothing changes
    assert sets.resolve(TENANT, "a") == v1
    sets.close()


def test_a_new_state_of_a_resident_task_is_loaded_before_it_is_asked_for(store, backbone, one_set) -> None:
    sets = make_sets(store, backbone, 10 * one_set)
    sets.acquire(TENANT, "a").release()
    stored = store.inner.put(TENANT, "a", prompt_bytes(backbone.info, seed=9))
    sets.follow(store.inner.state(TENANT, "a"))
    new = SetKey(TENANT, "a", stored.version, stored.sha256)
    wait_until(lambda: new in sets.cache.table, 10, "the prefetch of the new version")
    sets.follow(store.inner.state(TENANT, "b"))  # b was never used here: nothing loads
    assert not sets.cache.resident_keys(TENANT, "b")
    sets.close()


def test_a_tombstone_drops_the_task_and_a_later_state_brings_it_back(store, backbone, one_set) -> None:
    sets = make_sets(store, backbone, 10 * one_set)
    sets.acquire(TENANT, "a").release()
    store.inner.delete(TENANT, "a")
    tombstone = store.inner.state(TENANT, "a")
    assert tombstone.active is None and tombstone.revision > 0
    sets.follow(tombstone)
    assert not sets.cache.resident_keys(TENANT, "a")
    with pytest.raises(NotFound):
        sets.acquire(TENANT, "a")
    store.inner.put(TENANT, "a", prompt_bytes(backbone.info, seed=3))
    sets.follow(store.inner.state(TENANT, "a"))
    with sets.acquire(TENANT, "a") as lease:
        assert lease.key.version == 2  # numbers never repeat after a delete
    sets.close()
