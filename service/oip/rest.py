"""The Open Inference Protocol's REST endpoints (``/v2``): thin adapters from HTTP to ``OpenInference``.

Same port and same keys as ``/v1`` (``Authorization: Bearer``); the server-level endpoints (``/v2``, health) need
no key, as ``/healthz`` and ``/readyz``. Errors answer as the protocol says, ``{"error": "<code>: <message>"}``,
with the status of the typed error (``service/errors.py``). These routes follow the protocol's own specification
and stay out of ``/openapi.json``, which describes ``/v1``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from lpt.errors import LptError
from service.api.body import read_capped
from service.errors import RETRY_AFTER_S, BadRequest, http_status
from service.oip.codec import HEADER_LENGTH, InferRequest, encode_rest_response, parse_rest_request
from service.oip.frontend import InferAnswer, OpenInference, request_limit

MODEL = "/v2/models/{task}"
VERSION = "/v2/models/{task}/versions/{version}"
# Paths the request metrics name (service/app.py), the rest counting as "other".
OIP_ENDPOINTS = frozenset(
    {
        f"{MODEL}/infer",
        f"{VERSION}/infer",
        MODEL,
        VERSION,
        f"{MODEL}/ready",
        f"{VERSION}/ready",
        "/v2/repository/index",
        "/v2/health/live",
        "/v2/health/ready",
    }
)


def oip_error(exc: LptError) -> JSONResponse:
    """The protocol's error body, the typed code kept at the start of the message."""
    status = http_status(exc)
    headers = {"Retry-After": RETRY_AFTER_S[status]} if status in RETRY_AFTER_S else None
    return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)


class OipRoute(APIRoute):
    """A route whose typed errors answer in the protocol's format instead of ``/v1``'s."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except LptError as exc:
                return oip_error(exc)
            except RequestValidationError as exc:
                return oip_error(BadRequest(f"invalid request: {exc.errors()[:1]}"))

        return guarded


router = APIRouter(route_class=OipRoute, include_in_schema=False)


def oip_of(request: Request) -> OpenInference:
    return request.app.state.oip


def tenant_of(request: Request) -> str:
    return oip_of(request).tenant(request.headers.get("authorization"))


def ok(ready: bool) -> Response:
    return Response(status_code=200 if ready else 503)


# -- server ---------------------------------------------------------------------------------------------------------
@router.get("/v2")
async def server_metadata() -> JSONResponse:
    return JSONResponse(OpenInference.server_metadata())


@router.get("/v2/health/live")
async def live(request: Request) -> Response:
    return ok(oip_of(request).live)


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    return ok(await run_in_threadpool(oip_of(request).ready))


# -- models ---------------------------------------------------------------------------------------------------------
@router.get(MODEL)
@router.get(VERSION)
async def model_metadata(request: Request, task: str, version: str = "") -> JSONResponse:
    tenant = tenant_of(request)
    metadata = await run_in_threadpool(oip_of(request).model_metadata, tenant, task, version)
    return JSONResponse(metadata.to_dict())


@router.get(f"{MODEL}/ready")
@router.get(f"{VERSION}/ready")
async def model_ready(request: Request, task: str, version: str = "") -> Response:
    tenant = tenant_of(request)
    return ok(await run_in_threadpool(oip_of(request).model_ready, tenant, task, version))


@router.post(f"{MODEL}/infer")
@router.post(f"{VERSION}/infer")
async def infer(request: Request, task: str, version: str = "") -> Response:
    oip = oip_of(request)
    tenant = tenant_of(request)
    limit = request_limit(oip.service.config.max_image_bytes)

    async def read_request() -> InferRequest:
        body = await read_capped(request, limit)
        return parse_rest_request(body, request.headers.get(HEADER_LENGTH))

    return infer_response(await oip.infer(tenant, task, version, read_request))


def infer_response(answer: InferAnswer) -> Response:
    body, header_length = encode_rest_response(
        answer.task, answer.version, answer.request_id, answer.outputs, {"sha256": answer.sha256}
    )
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


# -- model repository -----------------------------------------------------------------------------------------------
@router.post("/v2/repository/index")
async def repository_index(request: Request) -> JSONResponse:
    """Every stored version of the tenant's tasks (the body's ``ready`` filter changes nothing: all are ready)."""
    tenant = tenant_of(request)
    await json_body(request)
    entries = await run_in_threadpool(oip_of(request).index, tenant)
    return JSONResponse([vars(e) for e in entries])


@router.post("/v2/repository/models/{task}/load")
async def repository_load(request: Request, task: str) -> Response:
    return await _repository_call(request, task, oip_of(request).load)


@router.post("/v2/repository/models/{task}/unload")
async def repository_unload(request: Request, task: str) -> Response:
    return await _repository_call(request, task, oip_of(request).unload)


async def _repository_call(request: Request, task: str, call: Callable[[str, str, dict], object]) -> Response:
    """A repository ``load`` or ``unload``: the caller's tenant, the body's parameters, 200 with no body."""
    tenant = tenant_of(request)
    parameters = (await json_body(request)).get("parameters", {})
    await run_in_threadpool(call, tenant, task, parameters)
    return Response(status_code=200)


async def json_body(request: Request) -> dict:
    """A small optional JSON object body (the repository calls); {} when empty."""
    body = await read_capped(request, 64 * 1024)
    if not body.strip():
        return {}
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise BadRequest(f"the body is not JSON: {str(exc)[:200]}", "body") from exc
    if not isinstance(parsed, dict) or not isinstance(parsed.get("parameters", {}), dict):
        raise BadRequest("the body must be a JSON object (with an object of parameters)", "body")
    return parsed
