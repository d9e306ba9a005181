"""The batch loop: take a batch from the queue -> run the engine's forward -> settle every request in it.

The loop runs in its own thread, so model code never runs on the event loop, and its heartbeat backs
``/healthz``. Each iteration is guarded as a whole: whatever fails (the forward, stacking the images,
bookkeeping), that batch's requests fail with ``BatchFailed`` (500), the failure is logged and counted
(``lpt_batch_failures_total``), and the loop takes the next batch. Nothing is left hanging.

A device that fails every forward would fail every request forever while the loop itself stays alive, so the
loop also counts failed batches in a row (``failing_batches``, gauge ``lpt_consecutive_batch_failures``); the
health endpoints read it (``application.py``) and one good batch sets it back to 0; while it is not 0, an idle
loop runs a probe forward (the engine's warm-up) every ``PROBE_INTERVAL_S``, which counts as a batch.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import InvalidStateError

import torch

from service.engine import Engine
from service.errors import BatchFailed, ShuttingDown
from service.metrics import ServiceMetrics
from service.queue import FairQueue, RowResult, WorkItem, collect_batch

log = logging.getLogger(__name__)

FAILURE_PAUSE_S = 0.05  # after a failed iteration, so a persistent fault cannot spin the loop hot
# While batches fail, an idle loop tries a probe forward this often: a replica taken out of traffic gets no
# batches, so without probes it could never see the device recover.
PROBE_INTERVAL_S = 2.0


class EngineWorker:
    """The batching loop in a thread: collect a batch, run it, resolve or fail every future.

    Args:
        engine: what runs the forward.
        queue: where requests wait.
        metrics: batch and latency metrics.
        max_batch_size: images per forward at most.
        max_wait_s: how long a batch stays open after its first image.
    """

    def __init__(
        self, engine: Engine, queue: FairQueue, metrics: ServiceMetrics, max_batch_size: int, max_wait_s: float
    ):
        self.engine = engine
        self.queue = queue
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.heartbeat = time.monotonic()
        self.batches = 0
        self.failing_batches = 0  # failed batches since the last good one
        self._last_probe = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lpt-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Finish what is queued (bounded by ``timeout``), then stop; whatever is left fails."""
        self.queue.close()
        deadline = time.monotonic() + timeout
        while len(self.queue) and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        self.queue.fail_all(ShuttingDown("the service stopped before this request ran"))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch: list[WorkItem] = []
            try:
                self.heartbeat = time.monotonic()
                collect_batch(self.queue, self.max_batch_size, self.max_wait_s, batch=batch)
                self.metrics.queue_depth.set(len(self.queue))
                if batch:
                    self.run_batch(batch)
                    self.heartbeat = time.monotonic()
                elif self.failing_batches and time.monotonic() - self._last_probe >= PROBE_INTERVAL_S:
                    self.probe()
            except Exception as exc:
                self._fail(batch, exc, "loop")
                time.sleep(FAILURE_PAUSE_S)

    def probe(self) -> None:
        """A forward with no request in it, while batches fail: success counts as a good batch."""
        self._last_probe = time.monotonic()
        try:
            self.engine.warm_up()
        except Exception as exc:
            self._fail([], exc, "probe")
            return
        self._succeeded()

    def _succeeded(self) -> None:
        if self.failing_batches:
            log.warning("a batch succeeded after %d failed batches in a row", self.failing_batches)
        self.failing_batches = 0
        self.metrics.consecutive_batch_failures.set(0)

    def run_batch(self, batch: list[WorkItem]) -> None:
        """One forward for ``batch`` and every row's future settled; a failed forward fails the batch."""
        started = time.monotonic()
        for item in batch:
            self.metrics.queue_wait.observe(started - item.enqueued)
        entries = [item.entry for item in batch]
        try:
            probs = self.engine.infer(torch.stack([item.image for item in batch]), entries)
        except Exception as exc:
            self._fail(batch, exc, "forward")
            return
        self.batches += 1
        self._succeeded()
        self.metrics.inference_duration.observe(time.monotonic() - started)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tasks.observe(len({(e.key.tenant, e.key.task) for e in entries}))
        for item, p in zip(batch, probs, strict=True):
            _settle(item, result=RowResult(probs=p, entry=item.entry))

    def _fail(self, batch: list[WorkItem], exc: Exception, stage: str) -> None:
        """Fail every unsettled request of ``batch``; log and count the failure. Must not raise itself."""
        try:
            self.failing_batches += 1
            self._last_probe = time.monotonic()  # the next probe waits a whole interval after any failure
            self.metrics.consecutive_batch_failures.set(self.failing_batches)
            log.error(
                "batch of %d images failed in the %s (%d failed batches in a row)",
                len(batch), stage, self.failing_batches, exc_info=exc,
            )  # fmt: skip
            self.metrics.batch_failures.labels(stage).inc()
        finally:
            error = BatchFailed(f"inference failed for this batch: {type(exc).__name__}")
            for item in batch:
                _settle(item, error=error)


def _settle(item: WorkItem, result: RowResult | None = None, error: Exception | None = None) -> None:
    # The caller may have given up (deadline) and cancelled; a settled future must not raise here.
    try:
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)
    except InvalidStateError:
        pass
