"""Fixtures for the hardening tests (issue 8): the real app with its lifespan, driven from sync tests.

``serve(config, backbone)`` runs the app's lifespan on an event loop in a background thread (an anyio
blocking portal) and hands back a ``Served`` with sync ``get``/``post``/``delete`` helpers over an
``httpx.AsyncClient`` on ``ASGITransport``, plus ``gather`` for concurrent requests. No pytest async
plugin is needed, and one app can be shared by a whole module.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from PIL import Image

from lpt.backbone import Backbone, BackboneInfo, load_backbone
from lpt.init import init_prompt_set
from lpt.prompt_set import PromptSet, encode
from prompts_store.base import PromptStore
from service.app import create_app
from service.settings import ServiceConfig
from service.state import ServiceState

KEYS = {"alpha": "alpha-secret-0123456789", "beta": "beta-secret-9876543210"}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


class Served:
    """A running app: sync request helpers that run on the app's own event loop."""

    def __init__(self, app: Any, portal: BlockingPortal, client: httpx.AsyncClient):
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


def make_config(tmp_path: Path, **overrides: Any) -> ServiceConfig:
    base = ServiceConfig(
        store=str(tmp_path / "store"),
        data_dir=tmp_path,
        backbone="test_vit",
        backbone_weights="random:0",
        img_size=32,
        device="cpu",
        reconcile_s=0.5,
        replica_id="hardening",
    )
    return replace(base, **overrides)


@contextmanager
def serve(config: ServiceConfig, backbone: Backbone, store: PromptStore | None = None) -> Iterator[Served]:
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


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    return load_backbone("test_vit", "random:0", img_size=32)


def prompt_set(info: BackboneInfo, classes: int = 3, pool: int = 2, seed: int = 0, **kw: Any) -> PromptSet:
    names = [f"class-{i}" for i in range(classes)]
    return init_prompt_set(info, names, prompt_length=2, pool_size=pool, share_blocks=info.depth // 2, seed=seed, **kw)


def prompt_bytes(info: BackboneInfo, classes: int = 3, pool: int = 2, seed: int = 0) -> bytes:
    return encode(prompt_set(info, classes=classes, pool=pool, seed=seed))


def png_bytes(size: tuple[int, int] = (48, 40), mode: str = "RGB", color: Any = None, **save: Any) -> bytes:
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


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"].get("code"), str) and body["error"]["code"], body
    assert isinstance(body["error"].get("message"), str), body
    return body["error"]["code"]
