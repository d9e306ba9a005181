"""The inference worker: batch -> prompt bank + slot index -> one LPT forward -> futures resolved.

A batch that fails fails every request in it; nothing is left hanging. The worker runs in its own
thread so model code never runs on the event loop, and its heartbeat backs ``/healthz``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import InvalidStateError
from dataclasses import dataclass

import torch

from lpt.backbone import Backbone
from lpt.forward import PromptBank, prompted_forward
from service.batcher import FairQueue, WorkItem, collect_batch
from service.errors import BatchFailed, ShuttingDown
from service.metrics import ServiceMetrics
from service.prompt_cache import ResidentSet

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RowResult:
    """Class probabilities of one image (``[C]`` float32, CPU) and the version that produced them."""

    probs: torch.Tensor
    entry: ResidentSet


class Engine:
    """Runs mixed-task batches through the frozen backbone.

    Args:
        backbone: the frozen ViT (already on ``device``).
        device: where the forward runs.
        dtype: compute dtype; bf16/fp16 run under autocast.
    """

    def __init__(self, backbone: Backbone, device: torch.device | str, dtype: torch.dtype):
        self.backbone = backbone
        self.device = torch.device(device)
        self.dtype = dtype

    def infer(self, images: torch.Tensor, entries: list[ResidentSet]) -> list[torch.Tensor]:
        """Probabilities for each row; rows of different geometry (L, S) run as separate forwards.

        Args:
            images: ``[B, 3, H, W]`` preprocessed images (any device).
            entries: the resident prompt set of each row.
        """
        out: list[torch.Tensor | None] = [None] * len(entries)
        by_geometry: dict[tuple[int, int], list[int]] = defaultdict(list)
        for row, entry in enumerate(entries):
            by_geometry[entry.geometry].append(row)
        images = images.to(self.device, non_blocking=True)
        for rows in by_geometry.values():
            sub = images if len(rows) == len(entries) else images[torch.tensor(rows, device=self.device)]
            probs = self._forward(sub, [entries[r] for r in rows]).float().cpu()
            for i, row in enumerate(rows):
                out[row] = probs[i, : entries[row].prompt_set.num_classes]
        return out  # type: ignore[return-value]

    def _forward(self, images: torch.Tensor, entries: list[ResidentSet]) -> torch.Tensor:
        distinct = list({e.key: e for e in entries}.values())  # one slot per prompt set, in first-seen order
        slot_of = {e.key: i for i, e in enumerate(distinct)}
        if len(distinct) == 1:
            bank = distinct[0].bank  # views over the resident tensors: nothing to copy
        else:
            bank = PromptBank.stack(
                [e.prompt_set for e in distinct], self.device, self.dtype, [e.shared_kv for e in distinct]
            )
        slots = torch.tensor([slot_of[e.key] for e in entries], device=self.device)
        with torch.inference_mode(), self._autocast():
            out = prompted_forward(self.backbone.model, images, bank, slots)
            return out.logits.float().softmax(dim=-1)

    def _autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)


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
        self.queue.fail_all(ShuttingDown("shutting_down", "the service stopped before this request ran"))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            batch = collect_batch(self.queue, self.max_batch_size, self.max_wait_s)
            self.metrics.queue_depth.set(len(self.queue))
            if batch:
                self.run_batch(batch)
                self.heartbeat = time.monotonic()

    def run_batch(self, batch: list[WorkItem]) -> None:
        started = time.monotonic()
        for item in batch:
            self.metrics.queue_wait.observe(started - item.enqueued)
        entries = [item.payload for item in batch]
        try:
            images = torch.stack([item.image for item in batch])
            probs = self.engine.infer(images, entries)
        except Exception as exc:
            log.exception("batch of %d images failed", len(batch))
            error = BatchFailed("batch_failed", f"inference failed for this batch: {type(exc).__name__}")
            for item in batch:
                _settle(item, error=error)
            return
        self.batches += 1
        self.metrics.inference_duration.observe(time.monotonic() - started)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tasks.observe(len({e.key[:2] for e in entries}))
        for item, p in zip(batch, probs, strict=True):
            _settle(item, result=RowResult(probs=p, entry=item.payload))


def _settle(item: WorkItem, result: RowResult | None = None, error: Exception | None = None) -> None:
    # The caller may have given up (deadline) and cancelled; a settled future must not raise here.
    try:
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)
    except InvalidStateError:
        pass
