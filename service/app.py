"""``create_app(config)``: the ASGI app; its lifespan builds, starts and stops the ``Service`` (and the Open
Inference Protocol's gRPC server, when ``grpc_port`` is set)."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

import lpt
from lpt.backbone import Backbone
from lpt.errors import LptError
from prompts_store.base import PromptStore
from service.api.routes import error_response, router
from service.application import Service
from service.demo import install_demo
from service.oip.frontend import OpenInference
from service.oip.grpc_server import start_grpc_server
from service.oip.rest import OIP_ENDPOINTS
from service.oip.rest import router as oip_router
from service.settings import ServiceConfig

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
    *OIP_ENDPOINTS,
}


def create_app(config: ServiceConfig, backbone: Backbone | None = None, store: PromptStore | None = None) -> FastAPI:
    """The ASGI app. ``backbone`` and ``store`` may be passed in (tests share one); else built from config."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = await run_in_threadpool(Service.build, config, backbone, store)
        app.state.lpt = service
        if service.auth.single_tenant:
            log.warning("no API keys configured: single-tenant mode, every caller is tenant 'default'")
        await run_in_threadpool(service.start)
        if config.demo:
            await run_in_threadpool(install_demo, service)
        app.state.oip = oip = OpenInference(service, config.pin_loaded_models)
        try:
            grpc_server = await start_grpc_server(oip, config.host, config.grpc_port) if config.grpc_port else None
        except BaseException:  # a taken port: the service does not start half-way
            await run_in_threadpool(service.stop)
            raise
        # "ready" is logged by the server once its socket accepts connections (service/cli.py), not here.
        log.debug("application started: backbone %s on %s", service.backbone.info.name, config.device)
        try:
            yield
        finally:
            if grpc_server is not None:  # in-flight calls finish while the batch loop still runs
                await grpc_server.stop(config.shutdown_timeout)
            oip.close()
            await run_in_threadpool(service.stop)

    app = FastAPI(
        title="lpt-serve",
        version=lpt.__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Multi-tenant Long-tailed Prompt Tuning inference on one frozen ViT.",
    )
    app.include_router(router)
    app.include_router(oip_router)
    _install_offline_docs(app)
    _install_error_handlers(app)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = route.path if route is not None and route.path in ENDPOINTS else "other"
        service: Service | None = getattr(request.app.state, "lpt", None)
        if service is not None:
            service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            service.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - started)
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
