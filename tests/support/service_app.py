"""The real app in-process, for the service tests (integration and hardening): its configuration, API keys, its
lifespan driven two ways, and readers of its answers.

``serve`` (async, for ``pytest.mark.anyio`` tests) yields ``(app, client)``; ``serve_in_thread`` (sync tests) runs
the lifespan on an event loop in a background thread (an anyio blocking portal) and yields a ``Served`` with sync
request helpers, so one app can be shared by a whole module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI

from lpt.backbone import Backbone
from prompts_store.base import PromptStore
from service.app import create_app
from service.settings import ServiceConfig
from tests.support.metrics import parse_metrics

if TYPE_CHECKING:  # the annotation only: the service object is reached through the app
    from service.application import Service

KEYS = {
    "acme": "acme-secret-0123456789",
    "globex": "globex-secret-9876543210",
    "alpha": "alpha-secret-0123456789",
    "beta": "beta-secret-9876543210",
}


def auth(tenant: str) -> dict[str, str]:
    """The Authorization header of ``tenant``'s key in ``KEYS``."""
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
        grpc_port=0,  # off: a test that wants gRPC names a free port
    )
    return replace(base, **overrides)


def state_of(app: FastAPI) -> Service:
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
    def state(self) -> Service:
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


# -- reading answers -----------------------------------------------------------------------------------------------
def error_code(response: httpx.Response) -> str:
    """The code of an error answer, checking its shape (``{"error": {"code", "message"[, "field"]}}``)."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"].get("code"), str) and body["error"]["code"], body
    assert isinstance(body["error"].get("message"), str), body
    return body["error"]["code"]


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """``parse_metrics`` of the app's /metrics."""
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    return parse_metrics(r.text)


def open_leases(state: Service) -> dict[tuple, int]:
    """Open leases per resident set: all zero once every request has settled."""
    table = state.prompt_sets.cache.table
    return {tuple(key): table.leases_of(key) for key in table.in_lru_order()}
