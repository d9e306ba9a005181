"""The cache's policy over a real embedded store: single-flight loads, eviction under leases, re-insert of a
resident version, deadlines while loading, and the retry of a failed hot swap."""

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

from lpt.errors import StoreUnavailable
from lpt.prompt_set import decode
from prompts_store import open_store
from prompts_store.base import ChangeEvent, PromptStore
from service.errors import DeadlineExceeded
from service.metrics import ServiceMetrics
from service.prompt_cache import PromptCache
from service.resident import SetKey
from tests.service_harness import prompt_bytes

TENANT = "acme"


class GatedStore:
    """A real store whose ``get`` is counted, can be held at a gate, and can fail for chosen versions."""

    def __init__(self, inner: PromptStore):
        self.inner = inner
        self.gets: Counter[int | None] = Counter()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_versions: dict[int, int] = {}  # version -> failures left

    def get(self, tenant: str, task: str, version: int | None = None) -> Any:
        self.gets[version] += 1
        assert self.gate.wait(30)
        if self.fail_versions.get(version, 0) > 0:
            self.fail_versions[version] -= 1
            raise StoreUnavailable(message="injected: the store is unreachable")
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


def make_cache(store: GatedStore, backbone, budget: int) -> PromptCache:
    return PromptCache(store, backbone.info, "cpu", torch.float32, budget, ServiceMetrics())


def test_concurrent_misses_share_one_load_and_each_get_a_lease(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, 10 * one_set)
    store.gate.clear()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(cache.acquire, TENANT, "a") for _ in range(8)]
        time.sleep(0.2)  # every caller has joined the load held at the gate
        store.gate.set()
        leases = [f.result(timeout=30) for f in futures]
    assert store.gets[None] == 1
    assert len({id(lease.entry) for lease in leases}) == 1
    key = leases[0].key
    assert key == SetKey(TENANT, "a", 1) and cache.table.leases_of(key) == 8
    for lease in leases:
        lease.release()
    assert cache.table.leases_of(key) == 0
    m = cache.metrics.registry
    assert m.get_sample_value("lpt_prompt_cache_misses_total") == 1
    assert m.get_sample_value("lpt_prompt_cache_hits_total") == 8  # every lease handed out
    cache.close()


def test_async_use_waits_on_the_flight_and_releases_on_exit(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, 10 * one_set)

    async def run() -> list[int]:
        async def one() -> int:
            async with cache.use(TENANT, "b") as lease:
                assert cache.table.leases_of(lease.key) >= 1
                await asyncio.sleep(0.01)
                return lease.key.version

        return await asyncio.gather(*(one() for _ in range(20)))

    assert asyncio.run(run()) == [1] * 20
    assert store.gets[None] == 1 and cache.table.leases_of(SetKey(TENANT, "b", 1)) == 0
    cache.close()


def test_a_caller_past_its_deadline_gives_up_and_its_lease_is_returned(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, 10 * one_set)
    store.gate.clear()

    async def late() -> None:
        async with cache.use(TENANT, "c", deadline=time.monotonic() + 0.1):
            pass

    with pytest.raises(DeadlineExceeded):
        asyncio.run(late())
    store.gate.set()
    key = SetKey(TENANT, "c", 1)
    deadline = time.monotonic() + 10
    while key not in cache.table and time.monotonic() < deadline:
        time.sleep(0.01)
    assert key in cache.table and cache.table.leases_of(key) == 0  # loaded, and the abandoned lease released
    cache.close()


def test_eviction_spares_leased_sets_and_the_budget_holds_once_released(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, int(2.5 * one_set))
    held = cache.acquire(TENANT, "a")
    for task in ("b", "c", "d"):
        cache.acquire(TENANT, task).release()
    resident = {k.task for k in cache.table.in_lru_order()}
    assert "a" in resident and len(resident) == 2  # a is leased: the oldest unleased went instead
    assert cache.resident_bytes <= cache.table.budget_bytes
    held.release()
    cache.acquire(TENANT, "b").release()
    assert cache.resident_bytes <= cache.table.budget_bytes and "a" not in {k.task for k in cache.table.in_lru_order()}
    cache.close()


def test_an_identical_reupload_keeps_the_leased_entry_and_the_lease_can_free_it(store, backbone, one_set) -> None:
    """The pin-leak scenario: re-installing a resident, leased version must not replace the entry."""
    cache = make_cache(store, backbone, int(1.5 * one_set))
    lease = cache.acquire(TENANT, "a")
    info = store.inner.active_version(TENANT, "a")
    again = cache.install(info, decode(store.inner.get(TENANT, "a").data))
    assert again is lease.entry and len(cache) == 1
    lease.release()
    cache.acquire(TENANT, "b").release()
    cache.acquire(TENANT, "c").release()
    assert SetKey(TENANT, "a", 1) not in cache.table and len(cache) == 1
    assert cache.resident_bytes <= cache.table.budget_bytes
    cache.close()


def test_a_versioned_lookup_then_an_unversioned_one_share_the_entry(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, 10 * one_set)
    # By number first, then "the active one": that loads v1 again, which is already resident and leased.
    with cache.acquire(TENANT, "a", version=1) as by_number, cache.acquire(TENANT, "a") as active:
        assert active.entry is by_number.entry
        assert cache.table.leases_of(by_number.key) == 2
    assert cache.table.leases_of(by_number.key) == 0
    cache.close()


def test_a_failed_hot_swap_keeps_the_old_version_and_is_retried(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, 10 * one_set)
    cache.acquire(TENANT, "a").release()  # this replica follows task a (active v1)
    v2 = store.inner.put(TENANT, "a", prompt_bytes(backbone.info, seed=42))
    store.fail_versions[v2.version] = 2
    cache.on_change(ChangeEvent(TENANT, "a", v2.version))
    time.sleep(0.05)
    assert cache.active_version(TENANT, "a") == 1  # the failed load left v1 serving
    deadline = time.monotonic() + 10
    while cache.active_version(TENANT, "a") != v2.version and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cache.active_version(TENANT, "a") == v2.version
    assert store.gets[v2.version] == 3  # two failures, then the retry that succeeded
    cache.close()


def test_a_superseded_swap_stops_retrying(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, 10 * one_set)
    cache.acquire(TENANT, "a").release()
    v2 = store.inner.put(TENANT, "a", prompt_bytes(backbone.info, seed=42))
    store.fail_versions[v2.version] = 1000
    cache.on_change(ChangeEvent(TENANT, "a", v2.version))
    time.sleep(0.3)
    cache.on_change(ChangeEvent(TENANT, "a", 1))  # rolled back before v2 ever loaded
    tries = store.gets[v2.version]
    time.sleep(1.0)
    assert store.gets[v2.version] <= tries + 1  # at most one retry already scheduled, then none
    assert cache.active_version(TENANT, "a") == 1
    cache.close()
