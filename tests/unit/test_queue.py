"""The request queue is plain code: tested here without a server, with a fake clock where time matters."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from service.errors import DeadlineExceeded, QueueFull, ShuttingDown
from service.queue import FairQueue, WorkItem, collect_batch
from tests.support.resident import tiny_lease

NAMES: dict[int, str] = {}  # id(image) -> the name a test gave it


def item(tenant: str = "a", name: str = "x", deadline: float | None = None) -> WorkItem:
    image = torch.zeros(3, 2, 2)
    NAMES[id(image)] = name
    return WorkItem(tenant=tenant, image=image, lease=tiny_lease(), deadline=deadline or time.monotonic() + 60)


def names(items: list[WorkItem]) -> list[str]:
    return [NAMES[id(it.image)] for it in items]


def test_batch_closes_at_max_size_without_waiting() -> None:
    q = FairQueue(100)
    for i in range(10):
        q.put(item(name=str(i)))
    started = time.monotonic()
    batch = collect_batch(q, max_size=4, max_wait_s=30)
    assert names(batch) == ["0", "1", "2", "3"]
    assert time.monotonic() - started < 5  # did not sit out the 30 s deadline
    assert len(q) == 6


def test_batch_closes_at_deadline_with_what_arrived() -> None:
    q = FairQueue(100)
    q.put(item(name="first"))
    late = threading.Timer(0.05, lambda: q.put(item(name="second")))
    late.start()
    batch = collect_batch(q, max_size=8, max_wait_s=0.3)
    late.join()
    assert names(batch) == ["first", "second"]


def test_empty_queue_returns_empty_batch_after_poll() -> None:
    assert collect_batch(FairQueue(4), max_size=8, max_wait_s=0.01, poll_s=0.01) == []


def test_round_robin_across_tenants() -> None:
    q = FairQueue(100)
    for i in range(6):
        q.put(item("flood", f"f{i}"))
    q.put(item("quiet", "q0"))
    batch = q.take(3)
    assert names(batch) == ["f0", "q0", "f1"]


def test_global_capacity_answers_queue_full() -> None:
    q = FairQueue(2)
    q.put(item("a"))
    q.put(item("b"))
    with pytest.raises(QueueFull):
        q.put(item("c"))
    with pytest.raises(QueueFull):
        q.check_room("c")


def test_one_tenant_cannot_take_the_whole_queue() -> None:
    q = FairQueue(10, tenant_capacity=5)
    for _ in range(5):
        q.put(item("flood"))
    with pytest.raises(QueueFull):
        q.put(item("flood"))
    q.check_room("quiet", 5)  # the other half stays open to other tenants
    for _ in range(5):
        q.put(item("quiet"))
    assert len(q) == 10


def test_put_many_is_all_or_nothing() -> None:
    q = FairQueue(3)
    q.put(item())
    with pytest.raises(QueueFull):
        q.put_many([item(), item(), item()])
    assert len(q) == 1


def test_expired_items_fail_with_deadline_and_are_not_batched() -> None:
    q = FairQueue(10)
    now = [100.0]
    stale, fresh = item(deadline=99.0), item(deadline=200.0)
    q.put_many([stale, fresh])
    batch = collect_batch(q, max_size=2, max_wait_s=0.0, clock=lambda: now[0])
    assert batch == [fresh]
    with pytest.raises(DeadlineExceeded):
        stale.future.result(timeout=1)


def test_cancelled_items_are_dropped() -> None:
    q = FairQueue(10)
    gone, kept = item(), item()
    q.put_many([gone, kept])
    gone.future.cancel()
    assert collect_batch(q, max_size=2, max_wait_s=0.0) == [kept]


def test_closed_queue_refuses_and_fail_all_settles_everything() -> None:
    q = FairQueue(10)
    waiting = [item(), item("b")]
    for it in waiting:
        q.put(it)
    q.close()
    with pytest.raises(ShuttingDown):
        q.put(item())
    assert q.fail_all(RuntimeError("stop")) == 2
    for it in waiting:
        with pytest.raises(RuntimeError):
            it.future.result(timeout=1)
