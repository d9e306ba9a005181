"""The one app harness of the service tests (integration and hardening): the real app with its lifespan, its
configuration, API keys, prompt sets, images, error and metrics readers.

Two ways to drive the same app: ``serve`` (async, for ``pytest.mark.anyio`` tests) yields ``(app, client)``;
``serve_in_thread`` (sync tests) runs the lifespan on an event loop in a background thread (an anyio blocking
portal) and yields a ``Served`` with sync request helpers, so one app can be shared by a whole module.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from lpt.backbone import Backbone, BackboneInfo
from lpt.init import init_prompt_set
from lpt.prompt_set import PromptSet, decode, encode
from prompts_store.base import PromptStore
from service.app import create_app
from service.settings import ServiceConfig
from service.state import ServiceState

KEYS = {
    "acme": "acme-secret-0123456789",
    "globex": "globex-secret-9876543210",
    "alpha": "alpha-secret-0123456789",
    "beta": "beta-secret-9876543210",
}
L, S = 2, 3  # test_vit at 32 px: depth 6, width 64; every set shares this geometry (one forward per batch)


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def make_config(tmp_path: Path, **overrides: Any) -> ServiceConfig:
    """The test service: test_vit at 32 px on the CPU in float32, an embedded store under ``tmp_path``."""
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
        replica_id="test",
    )
    return replace(base, **overrides)


def state_of(app: FastAPI) -> ServiceState:
    return app.state.lpt


# -- the app, async and from a thread ----------------------------------------------------------------------------
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


class Served:
    """A running app: sync request helpers that run on the app's own event loop."""

    def __init__(self, app: FastAPI, portal: BlockingPortal, client: httpx.AsyncClient):
        self.app = app
        self.portal = portal
        self.client = client

    @property
    def state(self) -> ServiceState:
        return self.app.state.lpt

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return self.portal.call(lambda: self.client.request(method, url, **kw))

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def delete(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", url, **kw)

    def gather(self, calls: list[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response | BaseException]:
        """Send requests concurrently (method, url, kwargs); exceptions are returned, not raised."""

        async def run() -> list[httpx.Response | BaseException]:
            coros = [self.client.request(m, u, **kw) for m, u, kw in calls]
            return await asyncio.gather(*coros, return_exceptions=True)

        return self.portal.call(run)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run an async function on the app's loop."""
        return self.portal.call(fn, *args)


@contextmanager
def serve_in_thread(config: ServiceConfig, backbone: Backbone, store: PromptStore | None = None) -> Iterator[Served]:
    """The real app (``create_app``) with its lifespan entered, on a background event loop."""
    app = create_app(config, backbone=backbone, store=store)
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(app.router.lifespan_context(app)):

        async def make_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30.0)

        client = portal.call(make_client)
        try:
            yield Served(app, portal, client)
        finally:
            portal.call(client.aclose)


# -- prompt sets and images ----------------------------------------------------------------------------------------
def make_set(
    info: BackboneInfo, classes: int = 4, pool: int = 3, seed: int = 0, top_k: int = 2, scale: float = 20.0
) -> PromptSet:
    """A set of the common geometry; prompts scaled up (``scale``) so a wrong prompt visibly moves the scores."""
    ps = init_prompt_set(
        info, [f"c{i}" for i in range(classes)], prompt_length=L, pool_size=pool, share_blocks=S, top_k=top_k, seed=seed
    )
    ps.shared_prompt = ps.shared_prompt * scale
    if ps.group_prompts is not None:
        ps.group_prompts = ps.group_prompts * scale
    return ps


def prompt_bytes(info: BackboneInfo, **kw: Any) -> bytes:
    """The encoded bytes of ``make_set(info, **kw)``."""
    return encode(make_set(info, **kw))


def set_bytes(info: BackboneInfo, **kw: Any) -> tuple[PromptSet, bytes]:
    """The encoded set and its decoded twin (what the service runs), for references."""
    data = prompt_bytes(info, **kw)
    return decode(data), data


def image_bytes(seed: int, size: tuple[int, int] = (40, 36)) -> bytes:
    """A PNG of random pixels (distinct images give distinct scores)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, "PNG")
    return buf.getvalue()


def png_bytes(size: tuple[int, int] = (48, 40), mode: str = "RGB", color: Any = None, **save: Any) -> bytes:
    """A PNG of one colour in any mode."""
    img = Image.new(mode, size, color if color is not None else _default_color(mode))
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (48, 40), mode: str = "RGB") -> bytes:
    img = Image.new(mode, size, _default_color(mode))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _default_color(mode: str) -> Any:
    return {"RGB": (120, 30, 200), "RGBA": (120, 30, 200, 128), "L": 90, "LA": (90, 128), "CMYK": (10, 20, 30, 0)}.get(
        mode, 1
    )


# -- reading answers -----------------------------------------------------------------------------------------------
def error_code(response: httpx.Response) -> str:
    """The code of an error answer, checking its shape (``{"error": {"code", "message"[, "field"]}}``)."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"].get("code"), str) and body["error"]["code"], body
    assert isinstance(body["error"].get("message"), str), body
    return body["error"]["code"]


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, keyed by ``name{label="v",...}`` (labels sorted), plus plain names."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """``parse_metrics`` of the app's /metrics."""
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    return parse_metrics(r.text)


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll a sync predicate (on the event loop) until true or ``timeout`` seconds pass."""
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(interval)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def open_leases(state: ServiceState) -> dict[tuple, int]:
    """Open leases per resident set: all zero once every request has settled."""
    table = state.cache.table
    return {tuple(key): table.leases_of(key) for key in table.in_lru_order()}
