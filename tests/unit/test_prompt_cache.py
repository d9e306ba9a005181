"""The cache's policy over a real embedded store: single-flight loads, eviction under leases, re-insert of a
resident version, deadlines while loading, the retry of a failed hot swap, and following the store's active
version through late and out-of-order change events."""

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
        self.reads: list[int | None] = []  # what each finished ``active_version`` call answered
        self.read_gate = threading.Event()  # held: ``active_version`` reads, then waits before answering
        self.read_gate.set()
        self.read_fails = False

    def get(self, tenant: str, task: str, version: int | None = None) -> Any:
        self.gets[version] += 1
        assert self.gate.wait(30)
        if self.fail_versions.get(version, 0) > 0:
            self.fail_versions[version] -= 1
            raise StoreUnavailable(message="injected: the store is unreachable")
        return self.inner.get(tenant, task, version)

    def active_version(self, tenant: str, task: str) -> Any:
        if self.read_fails:
            raise StoreUnavailable(message="injected: the store is unreachable")
        info = self.inner.active_version(tenant, task)
        assert self.read_gate.wait(30)
        self.reads.append(info.version)
        return info

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
    store.inner.activate(TENANT, "a", 1)  # rolled back before v2 ever loaded
    cache.on_change(ChangeEvent(TENANT, "a", 1))
    tries = store.gets[v2.version]
    time.sleep(1.0)
    assert store.gets[v2.version] <= tries + 1  # at most one retry already scheduled, then none
    assert cache.active_version(TENANT, "a") == 1
    cache.close()


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def upload(cache: PromptCache, store: GatedStore, backbone, seed: int) -> int:
    """What the upload route does: write the store, then install the validated set on this replica."""
    data = prompt_bytes(backbone.info, seed=seed)
    info = store.inner.put(TENANT, "a", data)
    cache.install(info, decode(data))
    return info.version


def watch_active(cache: PromptCache, seconds: float) -> set[int | None]:
    """Every active version of task a seen while polling for ``seconds``."""
    seen = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(cache.active_version(TENANT, "a"))
        time.sleep(0.002)
    return seen


def test_a_late_event_for_the_version_before_an_upload_does_not_revert_it(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, 10 * one_set)
    cache.acquire(TENANT, "a").release()  # follows task a at v1, which stays resident
    v2 = upload(cache, store, backbone, seed=42)
    cache.on_change(ChangeEvent(TENANT, "a", 1))  # a reconcile pass that read the store before the upload
    wait_until(lambda: store.reads == [v2])
    assert watch_active(cache, 0.2) == {v2}
    cache.close()


def test_a_store_read_that_started_before_an_upload_does_not_override_it(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, 10 * one_set)
    cache.acquire(TENANT, "a").release()
    v2 = store.inner.put(TENANT, "a", prompt_bytes(backbone.info, seed=42)).version  # another replica's upload
    store.read_gate.clear()
    cache.on_change(ChangeEvent(TENANT, "a", v2))  # its confirming read sees v2, then is held
    time.sleep(0.1)
    v3 = upload(cache, store, backbone, seed=43)  # this replica's upload finishes while that read is held
    assert cache.active_version(TENANT, "a") == v3
    store.read_gate.set()
    wait_until(lambda: store.reads == [v2])
    assert watch_active(cache, 0.2) == {v3}
    cache.close()


def test_events_are_confirmed_with_the_store_rollbacks_and_deletes_followed(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, 10 * one_set)
    cache.acquire(TENANT, "a").release()
    v2 = upload(cache, store, backbone, seed=42)
    store.inner.activate(TENANT, "a", 1)  # another replica rolls back
    cache.on_change(ChangeEvent(TENANT, "a", 1))
    wait_until(lambda: cache.active_version(TENANT, "a") == 1)
    cache.on_change(ChangeEvent(TENANT, "a", v2))  # late: the store says 1
    wait_until(lambda: len(store.reads) == 2)
    assert watch_active(cache, 0.2) == {1}
    store.inner.delete(TENANT, "a")
    cache.on_change(ChangeEvent(TENANT, "a", None))
    wait_until(lambda: cache.active_version(TENANT, "a") is None)
    assert SetKey(TENANT, "a", 1) not in cache.table and SetKey(TENANT, "a", v2) not in cache.table
    cache.close()


def test_when_the_store_cannot_confirm_the_event_is_followed(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, 10 * one_set)
    cache.acquire(TENANT, "a").release()
    v2 = store.inner.put(TENANT, "a", prompt_bytes(backbone.info, seed=42)).version
    store.read_fails = True
    cache.on_change(ChangeEvent(TENANT, "a", v2))
    wait_until(lambda: cache.active_version(TENANT, "a") == v2)
    assert cache.metrics.registry.get_sample_value("lpt_store_errors_total") == 1
    cache.close()


def test_an_upload_serves_at_once_when_its_change_event_came_first(store, backbone, one_set) -> None:
    cache = make_cache(store, backbone, 10 * one_set)
    cache.acquire(TENANT, "a").release()
    data = prompt_bytes(backbone.info, seed=42)
    info = store.inner.put(TENANT, "a", data)
    store.gate.clear()  # the swap that the event starts is still loading v2 ...
    cache.on_change(ChangeEvent(TENANT, "a", info.version))
    wait_until(lambda: store.gets[info.version] == 1)
    cache.install(info, decode(data))  # ... when the upload installs it
    assert cache.active_version(TENANT, "a") == info.version
    store.gate.set()
    cache.close()
