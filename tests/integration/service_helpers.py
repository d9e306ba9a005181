"""What only the service integration tests need on top of ``tests.support.service_app``: single-task references,
HTTP shorthands, and instrumentation of the real store and engine (proxies over the real parts, not mocks)."""

from __future__ import annotations

import io
import threading
from collections import Counter
from typing import Any

import anyio
import httpx
import torch
from PIL import Image

from lpt.backbone import Backbone
from lpt.forward import PromptBank, prompted_forward
from lpt.prompt_set import PromptSet
from prompts_store.base import PromptStore
from service.application import Service
from service.images import to_rgb
from tests.support.service_app import auth

SCORE_ATOL = 1e-5


# -- references ---------------------------------------------------------------------------------------------------
def reference_probs(backbone: Backbone, ps: PromptSet, data: bytes) -> torch.Tensor:
    """The single-task forward of one image on the same preprocessing: softmax of the logits, ``[C]``."""
    x = backbone.eval_transform(to_rgb(Image.open(io.BytesIO(data)))).unsqueeze(0)
    with torch.inference_mode():
        out = prompted_forward(backbone.model, x, PromptBank.stack([ps]))
    return out.logits.float().softmax(dim=-1)[0, : ps.num_classes]


def scores_of(predictions: list[dict]) -> torch.Tensor:
    """Service predictions (every class requested) -> probabilities indexed by class."""
    out = torch.full((len(predictions),), float("nan"))
    for p in predictions:
        out[p["index"]] = p["score"]
    return out


def assert_matches(predictions: list[dict], expected: torch.Tensor) -> None:
    got = scores_of(predictions)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.allclose(got, expected, atol=SCORE_ATOL, rtol=0), (got - expected).abs().max().item()
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)


# -- HTTP helpers -------------------------------------------------------------------------------------------------
async def upload(client: httpx.AsyncClient, task: str, data: bytes, tenant: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/octet-stream", **(auth(tenant) if tenant else {})}
    return await client.post("/v1/prompts", params={"task": task}, content=data, headers=headers)


async def classify(
    client: httpx.AsyncClient,
    task: str,
    image: bytes,
    tenant: str | None = None,
    version: int | None = None,
    top_k: int = 1000,
) -> httpx.Response:
    params: dict[str, Any] = {"task": task, "top_k": top_k}
    if version is not None:
        params["version"] = version
    headers = {"Content-Type": "image/png", **(auth(tenant) if tenant else {})}
    return await client.post("/v1/classify", params=params, content=image, headers=headers)


async def classify_each(
    client: httpx.AsyncClient, images: dict[str, bytes], timeout: float = 60
) -> dict[str, httpx.Response]:
    """Each task's image classified at once, all requests in flight together (so one batch can take them all)."""
    responses: dict[str, httpx.Response] = {}

    async def one(task: str) -> None:
        responses[task] = await classify(client, task, images[task])

    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            for task in images:
                tg.start_soon(one, task)
    return responses


# -- store and engine instrumentation -------------------------------------------------------------------------------
class CountingStore:
    """A real store with its reads counted (a proxy, not a mock: every call reaches the backend)."""

    def __init__(self, inner: PromptStore):
        self._inner = inner
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kw: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
            return attr(*args, **kw)

        return counted


class GatedInfer:
    """Replaces ``engine.infer``: each call signals ``entered`` and waits for ``release`` (bounded), then runs
    the real forward, or raises once when ``fail_next`` is set."""

    def __init__(self, state: Service, gate: bool = True, wait_s: float = 30.0):
        self.real = state.engine.infer
        self.entered = threading.Event()
        self.release = threading.Event()
        if not gate:
            self.release.set()
        self.wait_s = wait_s
        self.fail_next = False
        self.calls = 0
        self.batches: list[list[str]] = []  # the tenant of each row, per call
        state.engine.infer = self  # type: ignore[method-assign]

    def __call__(self, images: torch.Tensor, entries: list) -> list[torch.Tensor]:
        self.calls += 1
        self.batches.append([entry.key.tenant for entry in entries])
        self.entered.set()
        self.release.wait(self.wait_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure inside the forward")
        return self.real(images, entries)
