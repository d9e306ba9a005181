"""Image decoding for every tenant: fair between tenants, bounded in pixels, never later than a request's deadline.

Why a scheduler of its own: decoding a large PNG costs a second of CPU and cannot be interrupted. In a
first-come first-served pool, one tenant's dozen large images would hold every decode thread and another
tenant's small image would wait behind all of them. Here:

- each tenant has its own queue, and the threads take from the tenants in turn;
- one tenant runs at most ``threads`` decodes at once, and the pool has twice that many threads, so a tenant
  with nothing running always finds a free thread: its decode starts at once and shares the cores with the
  running ones (the OS divides CPU time between threads fairly) instead of waiting for them to finish;
- a tenant may have at most ``tenant_pixels`` pixels waiting or decoding (from the images' headers, read before
  any pixel is decoded): past that its request is refused at once (429), so its backlog stays bounded;
- a request whose deadline passes while it waits is failed (504), not decoded late.

The threads run below the batch loop's CPU priority (Linux ``nice``, per thread): a decode yields the cores as
soon as the next batch is ready, so decoding is done in the time the forward leaves free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from service.errors import DeadlineExceeded, QueueFull, ShuttingDown
from service.images import ImageDecoder

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    tenant: str
    blobs: Sequence[bytes]
    pixels: int
    deadline: float
    future: Future[list[torch.Tensor]] = field(default_factory=Future)


class DecodePool:
    """Decodes requests' images on a few threads, fairly between tenants (see the module docstring).

    Args:
        decoder: what each image goes through.
        threads: decodes one tenant may run at once (at least 1); the pool has twice as many threads.
        niceness: how much lower the threads' priority is than the rest of the process (0: the same; Linux only).
        tenant_pixels: pixels one tenant may have waiting or decoding at once.
    """

    def __init__(self, decoder: ImageDecoder, threads: int, niceness: int, tenant_pixels: int):
        self.decoder = decoder
        self.niceness = niceness
        self.per_tenant = max(1, threads)
        self.tenant_pixels = tenant_pixels
        self._cond = threading.Condition()
        self._queues: OrderedDict[str, deque[_Job]] = OrderedDict()  # tenants with waiting jobs, in turn order
        self._running: dict[str, int] = {}
        self._pixels: dict[str, int] = {}  # waiting or decoding, per tenant
        self._closed = False
        self.threads = [
            threading.Thread(target=self._work, name=f"lpt-decode-{i}", daemon=True) for i in range(2 * self.per_tenant)
        ]
        for thread in self.threads:
            thread.start()

    async def decode_all(self, tenant: str, blobs: Sequence[bytes], deadline: float) -> list[torch.Tensor]:
        """The request's images, decoded in order (``ImageDecoder.decode_all``) on one of the pool's threads.

        Args:
            tenant: whose request it is (fairness and the pixel budget).
            blobs: the encoded images.
            deadline: ``time.monotonic()`` after which the request has given up.

        Raises:
            QueueFull: the tenant's pixel budget would be exceeded (nothing was decoded).
            DeadlineExceeded: the deadline passed before the decode could start.
        """
        job = _Job(tenant, blobs, sum(self.decoder.pixels(b) for b in blobs), deadline)
        self._submit(job)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded("decoding the images did not finish within the deadline") from None
        finally:
            job.future.cancel()  # still waiting: it is skipped; already decoding or done: nothing happens

    def check_room(self, tenant: str) -> None:
        """Raise QueueFull now when ``tenant``'s pixel budget is already spent: such a request is refused before
        its body is read (a flooding tenant's rejected requests then cost next to nothing)."""
        with self._cond:
            held = self._pixels.get(tenant, 0)
            if held >= self.tenant_pixels:
                raise QueueFull(f"{held} pixels of your images are waiting to be decoded; retry shortly")

    def _submit(self, job: _Job) -> None:
        with self._cond:
            if self._closed:
                raise ShuttingDown("the service is shutting down")
            held = self._pixels.get(job.tenant, 0)
            if held and held + job.pixels > self.tenant_pixels:
                raise QueueFull(
                    f"{held} pixels of your images are waiting to be decoded (limit {self.tenant_pixels}); "
                    "retry shortly"
                )
            self._pixels[job.tenant] = held + job.pixels
            self._queues.setdefault(job.tenant, deque()).append(job)
            self._cond.notify()

    def _next_locked(self) -> _Job | None:
        """The first waiting job of the first tenant in turn that may run one more decode; that tenant goes to
        the back of the turn order."""
        for tenant, queue in self._queues.items():
            if self._running.get(tenant, 0) < self.per_tenant:
                job = queue.popleft()
                del self._queues[tenant]
                if queue:
                    self._queues[tenant] = queue
                self._running[tenant] = self._running.get(tenant, 0) + 1
                return job
        return None

    def _work(self) -> None:
        self._lower_priority()
        while True:
            with self._cond:
                job = self._next_locked()
                while job is None and not self._closed:
                    self._cond.wait()
                    job = self._next_locked()
                if job is None:
                    return
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running[job.tenant] -= 1
                    self._pixels[job.tenant] -= job.pixels
                    if not self._running[job.tenant]:
                        del self._running[job.tenant]
                    if not self._pixels[job.tenant]:
                        del self._pixels[job.tenant]
                    self._cond.notify_all()

    def _run(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # its request gave up while it waited
        if time.monotonic() > job.deadline:
            job.future.set_exception(DeadlineExceeded("the request's deadline passed before its images were decoded"))
            return
        try:
            job.future.set_result(self.decoder.decode_all(job.blobs))
        except BaseException as exc:
            job.future.set_exception(exc)

    def _lower_priority(self) -> None:
        if self.niceness <= 0 or sys.platform != "linux":
            return
        try:  # on Linux the niceness of a thread id is that thread's own; raising it needs no privilege
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.niceness)
        except OSError as exc:
            log.warning("decode threads keep the process priority: %s", exc)

    def close(self) -> None:
        """Stop the threads once they finish what they run; waiting requests fail (shutting down)."""
        with self._cond:
            self._closed = True
            waiting = [job for queue in self._queues.values() for job in queue]
            self._queues.clear()
            self._cond.notify_all()
        for job in waiting:
            with contextlib.suppress(Exception):
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(ShuttingDown("the service stopped before this request was decoded"))
