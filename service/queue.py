"""The request queue: per-tenant fair queues and dynamic batching, plain code unit-testable without a server.

``FairQueue`` bounds the total number of waiting images and hands them out round-robin across
tenants, so one tenant flooding the service delays only itself. ``collect_batch`` closes a batch at
``max_size`` images or ``max_wait_s`` after its first image, whichever comes first. Items whose
deadline has passed are failed on the spot (504) instead of wasting a forward pass.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from service.errors import DeadlineExceeded, QueueFull, ShuttingDown
from service.resident import Lease, ResidentSet


@dataclass(frozen=True)
class RowResult:
    """Class probabilities of one image (``[C]`` float32, CPU) and the resident version that produced them."""

    probs: torch.Tensor
    entry: ResidentSet


@dataclass(eq=False)
class WorkItem:
    """One image waiting for a forward pass, holding a lease on its prompt set until it settles.

    Attributes:
        tenant: fairness key.
        image: preprocessed ``[3, H, W]`` tensor.
        lease: the prompt set this row runs with; released when ``future`` settles, whatever way it settles
            (result, error, cancellation).
        deadline: ``time.monotonic()`` after which the caller has given up.
        future: resolved by the worker with the row's result, or failed with an error; the caller may cancel
            it while it waits in the queue (it is then dropped), not once a batch has taken it.
        enqueued: when it entered the queue.
    """

    tenant: str
    image: torch.Tensor
    lease: Lease
    deadline: float
    future: Future[RowResult] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.future.add_done_callback(lambda _future: self.lease.release())

    @property
    def entry(self) -> ResidentSet:
        return self.lease.entry


class FairQueue:
    """Bounded per-tenant FIFO queues with round-robin hand-out and per-tenant admission. Thread-safe.

    Round-robin hand-out alone is not fair under overload: a flooding tenant would fill the shared
    bound and every other tenant would get 429. So each tenant may hold at most ``tenant_capacity``
    of the ``capacity`` places, and the rest stays open to others.

    Args:
        capacity: most items waiting in total.
        tenant_capacity: most items one tenant may have waiting (default: ``capacity``).
    """

    def __init__(self, capacity: int, tenant_capacity: int | None = None):
        self.capacity = capacity
        self.tenant_capacity = min(capacity, tenant_capacity or capacity)
        self._queues: OrderedDict[str, deque[WorkItem]] = OrderedDict()
        self._size = 0
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return self._size

    def _check_locked(self, tenant: str, count: int) -> None:
        if self._closed:
            raise ShuttingDown("the service is shutting down")
        if self._size + count > self.capacity:
            raise QueueFull(f"{self._size} images are waiting; retry shortly")
        waiting = len(self._queues.get(tenant, ()))
        if waiting + count > self.tenant_capacity:
            raise QueueFull(
                f"{waiting} of your images are waiting (per-tenant limit {self.tenant_capacity}); retry shortly"
            )

    def check_room(self, tenant: str, count: int = 1) -> None:
        """Raise QueueFull/ShuttingDown now if ``count`` items of ``tenant`` would not be admitted.

        Lets the caller reject before reading and decoding a body, so a 429 costs next to nothing.
        """
        with self._cond:
            self._check_locked(tenant, count)

    def put(self, item: WorkItem) -> None:
        self.put_many([item])

    def put_many(self, items: list[WorkItem]) -> None:
        """All or nothing: a multi-image request is never half-queued (items of one tenant).

        Rejected items are cancelled (so they release their leases) before the error is raised.
        """
        if not items:
            return
        with self._cond:
            try:
                self._check_locked(items[0].tenant, len(items))
            except (QueueFull, ShuttingDown):
                for item in items:
                    item.future.cancel()
                raise
            queue = self._queues.setdefault(items[0].tenant, deque())
            queue.extend(items)
            self._size += len(items)
            self._cond.notify()

    def take(self, max_items: int) -> list[WorkItem]:
        """Up to ``max_items`` without waiting, one per tenant in turn."""
        out: list[WorkItem] = []
        with self._cond:
            while self._queues and len(out) < max_items:
                tenant, queue = next(iter(self._queues.items()))
                out.append(queue.popleft())
                self._size -= 1
                del self._queues[tenant]
                if queue:  # back of the line: the next tenant goes first next time
                    self._queues[tenant] = queue
        return out

    def wait(self, timeout: float) -> bool:
        """Block until an item is waiting (True) or ``timeout`` passes (False)."""
        with self._cond:
            if self._size:
                return True
            self._cond.wait(timeout)
            return self._size > 0

    def close(self) -> None:
        """Refuse new items; waiting ones stay to be drained."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def fail_all(self, error: Exception) -> int:
        """Fail every waiting item (used when the worker cannot continue); returns how many."""
        items = self.take(self._size or 1)
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)
        return len(items)


def collect_batch(
    queue: FairQueue,
    max_size: int,
    max_wait_s: float,
    poll_s: float = 0.25,
    clock: Callable[[], float] = time.monotonic,
    batch: list[WorkItem] | None = None,
) -> list[WorkItem]:
    """Wait up to ``poll_s`` for a first item, then fill the batch until ``max_size`` or ``max_wait_s``.

    Returns an empty list when nothing arrived within ``poll_s`` (the caller's loop uses that tick
    to check for shutdown and to prove it is alive).

    Args:
        batch: the list to fill (and return); a caller that passes its own still holds every item taken
            so far if this raises, and can fail them.
    """
    batch = [] if batch is None else batch
    if not queue.wait(poll_s):
        return batch
    close_at = clock() + max_wait_s
    while True:
        for item in queue.take(max_size - len(batch)):
            # RUNNING from here on: a caller that gives up can no longer cancel it, and the engine settles it once.
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled while waiting (its caller gave up): settling it would raise
            if clock() > item.deadline:
                item.future.set_exception(DeadlineExceeded("request timed out in the queue"))
            else:
                batch.append(item)
        remaining = close_at - clock()
        if len(batch) >= max_size or remaining <= 0:
            return batch
        queue.wait(remaining)
        if not len(queue) and clock() >= close_at:
            return batch
