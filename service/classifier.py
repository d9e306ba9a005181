"""Classification as the front ends see it: one call from a request's images to its labelled predictions.

``Classifier.classify`` names every stage of a request: admission (draining, then the tenant's room in the
queue, before a byte of the body is read), reading the images, a lease on the task's prompt set, decoding,
queueing one row per image for the batch loop (``worker.py``), waiting for the rows, and the top-k with labels.
``Classifier.probabilities`` takes the same path and answers every class probability with the class names (the
Open Inference Protocol's front end). The front ends call these; none of them touches the queue, the cache or
torch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import torch

from service.decode_pool import DecodePool
from service.errors import DeadlineExceeded, ShuttingDown
from service.prompt_sets import PromptSets
from service.queue import FairQueue, RowResult, WorkItem
from service.resident import SetKey

ReadImages = Callable[[], Awaitable[list[bytes]]]


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    """The answer to one request: which set answered (version and sha256) and each image's predictions."""

    task: str
    version: int
    sha256: str
    predictions: list[list[Prediction]]


@dataclass(frozen=True)
class Probabilities:
    """The answer to one request with every class: which set answered, its class names, and ``probs``, one row
    of class probabilities per image (``[N, C]`` float32)."""

    task: str
    version: int
    sha256: str
    class_names: list[str]
    probs: np.ndarray


class Classifier:
    """Runs classification requests of every tenant through one queue and one batch loop.

    Args:
        prompt_sets: where each request's prompt set comes from.
        queue: the fair queue the batch loop takes from.
        decode_pool: the threads that decode request images.
        request_timeout: seconds a request may take in all (504 after it).
        draining: set once the service stops taking work (503 from then on).
    """

    def __init__(
        self,
        prompt_sets: PromptSets,
        queue: FairQueue,
        decode_pool: DecodePool,
        request_timeout: float,
        draining: threading.Event,
    ):
        self.prompt_sets = prompt_sets
        self.queue = queue
        self.decode_pool = decode_pool
        self.request_timeout = request_timeout
        self.draining = draining

    async def classify(
        self, tenant: str, task: str, version: int | None, read_images: ReadImages, top_k: int
    ) -> Classification:
        """Classify the images ``read_images`` returns with the task's prompt set.

        Args:
            tenant: who asks (fairness and namespace).
            task: task id.
            version: a stored version, or None for the active one.
            read_images: reads the request's encoded images; called only once the request is admitted, so an
                overloaded service refuses it before reading or decoding anything.
            top_k: predictions per image (at most the class count).
        """
        key, results = await self._run(tenant, task, version, read_images)
        return Classification(task, key.version, key.sha256, [_top_k(r, top_k) for r in results])

    async def probabilities(
        self, tenant: str, task: str, version: int | None, read_images: ReadImages
    ) -> Probabilities:
        """Every class probability of the images ``read_images`` returns, on the same path as ``classify``
        (admission, lease, decode, queue, batch), so the requests of both share batches.

        Args:
            tenant: who asks (fairness and namespace).
            task: task id.
            version: a stored version, or None for the active one.
            read_images: reads the request's encoded images once the request is admitted.
        """
        key, results = await self._run(tenant, task, version, read_images)
        names = list(results[0].entry.prompt_set.class_names)
        probs = torch.stack([r.probs for r in results]).float().numpy()
        return Probabilities(task, key.version, key.sha256, names, probs)

    async def _run(
        self, tenant: str, task: str, version: int | None, read_images: ReadImages
    ) -> tuple[SetKey, list[RowResult]]:
        """Admit, read, lease, decode, queue and wait: the key of the set that answered and one row per image."""
        deadline = time.monotonic() + self.request_timeout
        self.admit(tenant)
        blobs = await read_images()
        async with self.prompt_sets.lease(tenant, task, version, deadline) as lease:
            images = await self.decode_pool.decode_all(tenant, blobs, deadline)
            # Each row holds its own lease until its future settles, however it settles (the queue's business).
            items = [WorkItem(tenant=tenant, image=img, lease=lease.share(), deadline=deadline) for img in images]
            self.queue.put_many(items)
            results = await _results(items, deadline)
        return lease.key, results

    def admit(self, tenant: str) -> None:
        """Raise ShuttingDown or QueueFull now if a request of ``tenant`` would not be taken."""
        if self.draining.is_set():
            raise ShuttingDown("the service is shutting down")
        self.queue.check_room(tenant)
        self.decode_pool.check_room(tenant)


async def _results(items: list[WorkItem], deadline: float) -> list[RowResult]:
    try:
        return await asyncio.wait_for(
            asyncio.gather(*(asyncio.wrap_future(i.future) for i in items)),
            timeout=max(0.0, deadline - time.monotonic()),
        )
    except TimeoutError as exc:
        raise DeadlineExceeded("the request did not finish within its deadline") from exc


def _top_k(result: RowResult, k: int) -> list[Prediction]:
    probs: torch.Tensor = result.probs
    scores, idx = probs.topk(min(k, probs.shape[0]))
    names = result.entry.prompt_set.class_names
    return [Prediction(int(i), names[int(i)], float(s)) for s, i in zip(scores.tolist(), idx.tolist(), strict=True)]
