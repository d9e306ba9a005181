"""Helpers for the service acceptance tests (issue 4): the real app with its lifespan, prompt sets, images,
single-task references and a metrics reader. Fixtures live in ``conftest.py`` next to this file."""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import torch
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from lpt.backbone import Backbone, BackboneInfo
from lpt.forward import PromptBank, prompted_forward
from lpt.init import init_prompt_set
from lpt.prompt_set import PromptSet, decode, encode
from prompts_store.base import PromptStore
from service.app import create_app
from service.images import to_rgb
from service.settings import ServiceConfig
from service.state import ServiceState

KEYS = {"acme": "acme-secret-0123456789", "globex": "globex-secret-9876543210"}
L, S = 2, 3  # test_vit at 32 px: depth 6, width 64; every set shares this geometry (one forward per batch)
SCORE_ATOL = 1e-5


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def make_config(tmp_path: Path, **overrides: Any) -> ServiceConfig:
    base = ServiceConfig(
        store=str(tmp_path / "store"),
        data_dir=tmp_path,
        backbone="test_vit",
        backbone_weights="random:0",
        img_size=32,
        device="cpu",
        dtype="float32",
        max_wait_ms=2.0,
        reconcile_s=0.5,
        replica_id="it",
    )
    return replace(base, **overrides)


@asynccontextmanager
async def serve(
    config: ServiceConfig, backbone: Backbone, store: PromptStore | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app (``create_app``) with its lifespan entered, and an httpx client on its ASGI transport."""
    app = create_app(config, backbone=backbone, store=store)
    with anyio.fail_after(60):
        cm = app.router.lifespan_context(app)
        await cm.__aenter__()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30.0) as client:
            yield app, client
    finally:
        with anyio.fail_after(60):
            await cm.__aexit__(None, None, None)


def state_of(app: FastAPI) -> ServiceState:
    return app.state.lpt


# -- prompt sets, images, references ----------------------------------------------------------------------------
def make_set(info: BackboneInfo, classes: int = 4, pool: int = 3, seed: int = 0, top_k: int = 2) -> PromptSet:
    """A set of the common geometry; prompts scaled up so a wrong prompt visibly moves the scores."""
    ps = init_prompt_set(
        info, [f"c{i}" for i in range(classes)], prompt_length=L, pool_size=pool, share_blocks=S, top_k=top_k, seed=seed
    )
    ps.shared_prompt = ps.shared_prompt * 20
    if ps.group_prompts is not None:
        ps.group_prompts = ps.group_prompts * 20
    return ps


def set_bytes(info: BackboneInfo, **kw: Any) -> tuple[PromptSet, bytes]:
    """The encoded set and its decoded twin (what the service runs), for references."""
    data = encode(make_set(info, **kw))
    return decode(data), data


def image_bytes(seed: int, size: tuple[int, int] = (40, 36)) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, "PNG")
    return buf.getvalue()


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


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"].get("message"), str), body
    return body["error"]["code"]


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """Every sample of /metrics, keyed by ``name{label="v",...}`` (labels sorted), plus plain names."""
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll a sync predicate (on the event loop) until true or ``timeout`` seconds pass."""
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(interval)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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

    def __init__(self, state: ServiceState, gate: bool = True, wait_s: float = 30.0):
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
        self.batches.append([entry.key[0] for entry in entries])
        self.entered.set()
        self.release.wait(self.wait_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure inside the forward")
        return self.real(images, entries)
