"""``create_app(config)``: the lifespan wires backbone, store, cache, queue, engine and worker; routes only here."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

import lpt
from lpt.backbone import Backbone, load_backbone
from lpt.errors import LptError
from lpt.forward import PromptBank, prompted_forward
from lpt.init import init_prompt_set
from lpt.prompt_set import ValidationLimits
from prompts_store import open_store
from prompts_store.base import PromptStore
from service.api.routes import error_response, router
from service.auth import Authenticator
from service.demo import install_demo
from service.engine import DTYPES, Engine
from service.images import DecodePool, ImageDecoder
from service.metrics import ServiceMetrics
from service.prompt_cache import PromptCache
from service.queue import FairQueue
from service.settings import ServiceConfig
from service.state import ServiceState
from service.worker import EngineWorker

log = logging.getLogger(__name__)

ENDPOINTS = {
    "/v1/classify",
    "/v1/prompts",
    "/v1/prompts/{task}",
    "/v1/prompts/{task}/activate",
    "/v1/backbone",
    "/healthz",
    "/readyz",
    "/metrics",
}


def build_state(config: ServiceConfig, backbone: Backbone | None, store: PromptStore | None) -> ServiceState:
    """Load what is missing (backbone, store) and wire the parts together."""
    metrics = ServiceMetrics()
    dtype = DTYPES[config.compute_dtype]
    if backbone is None:
        backbone = load_backbone(config.backbone, config.backbone_weights, config.img_size)
    backbone.to(config.device)
    if store is None:
        store = open_store(config.store, max_bytes=config.max_prompt_bytes, timeout_s=config.store_timeout)
    limits = ValidationLimits(max_classes=config.max_classes)
    cache = PromptCache(
        store, backbone.info, config.device, dtype, config.cache_bytes, metrics, limits, model=backbone.model
    )
    queue = FairQueue(config.queue_size, config.tenant_queue_size)
    engine = Engine(backbone, config.device, dtype)
    worker = EngineWorker(engine, queue, metrics, config.max_batch_size, config.max_wait_ms / 1000.0)
    metrics.backbone_info.labels(backbone.info.name, backbone.info.fingerprint[:16]).set(1)
    return ServiceState(
        config=config,
        backbone=backbone,
        store=store,
        cache=cache,
        engine=engine,
        worker=worker,
        queue=queue,
        metrics=metrics,
        auth=Authenticator(config.api_keys),
        decode_pool=DecodePool(
            ImageDecoder(backbone.eval_transform, config.max_image_bytes, config.max_image_pixels),
            config.decode_threads,
            config.decode_niceness,
        ),
        limits=limits,
    )


def warm_up(state: ServiceState) -> None:
    """One mixed two-task forward before /readyz says ready, so the first request pays no lazy init."""
    info = state.backbone.info
    sets = [
        init_prompt_set(info, ["a", "b"], prompt_length=2, pool_size=p, share_blocks=info.depth // 2, seed=i)
        for i, p in enumerate((2, 0))
    ]
    bank = PromptBank.stack(sets, device=state.engine.device, dtype=state.engine.dtype)
    images = torch.zeros(2, *info.input_size, device=state.engine.device)
    with torch.inference_mode(), state.engine._autocast():
        prompted_forward(state.backbone.model, images, bank, torch.tensor([0, 1], device=state.engine.device))
    state.warmed_up = True


def create_app(config: ServiceConfig, backbone: Backbone | None = None, store: PromptStore | None = None) -> FastAPI:
    """The ASGI app. ``backbone`` and ``store`` may be passed in (tests share one); else built from config."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await run_in_threadpool(build_state, config, backbone, store)
        app.state.lpt = state
        if state.auth.single_tenant:
            log.warning("no API keys configured: single-tenant mode, every caller is tenant 'default'")
        state.worker.start()
        await run_in_threadpool(warm_up, state)
        if config.demo:
            await run_in_threadpool(install_demo, state)
        state.subscription = state.store.subscribe(state.cache.on_change, config.reconcile_s)
        # "ready" is logged by the server once its socket accepts connections (service/cli.py), not here.
        log.debug("application started: backbone %s on %s", state.backbone.info.name, config.device)
        try:
            yield
        finally:
            state.draining = True
            await run_in_threadpool(state.worker.stop, config.shutdown_timeout)
            if state.subscription is not None:
                state.subscription.close()
            state.cache.close()
            state.decode_pool.close()
            if store is None:
                state.store.close()

    app = FastAPI(
        title="lpt-serve",
        version=lpt.__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Multi-tenant Long-tailed Prompt Tuning inference on one frozen ViT.",
    )
    app.include_router(router)
    _install_offline_docs(app)
    _install_error_handlers(app)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = route.path if route is not None and route.path in ENDPOINTS else "other"
        state: ServiceState | None = getattr(request.app.state, "lpt", None)
        if state is not None:
            state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            state.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - started)
        response.headers["X-LPT-Replica"] = config.replica_id
        return response

    return app


def _install_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the packaged swagger-ui-bundle assets: FastAPI's default pulls them from a CDN.

    ReDoc ships no installable offline bundle, so ``/redoc`` redirects to the offline Swagger UI instead of
    serving a page that stays blank without the internet.
    """
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-static", StaticFiles(directory=swagger_ui_path), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="lpt-serve API",
            swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/docs-static/favicon-32x32.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> RedirectResponse:
        return RedirectResponse("/docs", status_code=308)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LptError)
    async def lpt_error(_request: Request, exc: LptError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        body = {
            "code": "invalid_request",
            "message": f"{where}: {first.get('msg', 'invalid request')}",
            "field": str(first.get("loc", ["", ""])[-1]),
        }
        return JSONResponse({"error": body}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names only the first route on the path; FastAPI makes one route per method.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(
            {"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", type(exc).__name__)
        return JSONResponse({"error": {"code": "internal_error", "message": "internal server error"}}, status_code=500)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path (the ``Allow`` header of a 405, RFC 9110 15.5.6)."""
    methods: set[str] = set()
    routes = list(request.app.router.routes)
    while routes:
        route = routes.pop()
        included = getattr(route, "original_router", None)  # FastAPI wraps each included router
        if included is not None:
            routes += included.routes
            continue
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)
