"""HTTP endpoints: thin adapters from requests to the application objects (``service/application.py``).

Typed errors are mapped to HTTP in one handler (``error_response``).
"""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from lpt.errors import LptError
from lpt.ids import ID_MAX_LENGTH, ID_PATTERN, check_task_id
from lpt.prompt_set import FORMAT
from prompts_store.base import StoredVersion
from service.api import schemas
from service.api.body import MAX_PARTS, is_multipart, multipart_files, read_capped
from service.application import Service
from service.classifier import Classification
from service.errors import RETRY_AFTER_S, http_status
from service.images import check_content_type
from service.prompt_sets import meta_int

router = APIRouter()

ERRORS = {code: {"model": schemas.ErrorResponse} for code in (400, 401, 403, 404, 408, 413, 415, 422, 429, 503, 504)}


def error_response(exc: LptError) -> JSONResponse:
    status = http_status(exc)
    headers = {"Retry-After": RETRY_AFTER_S[status]} if status in RETRY_AFTER_S else None
    return JSONResponse({"error": exc.to_dict()}, status_code=status, headers=headers)


def service_of(request: Request) -> Service:
    return request.app.state.lpt


def tenant_of(request: Request) -> str:
    return service_of(request).auth.tenant_for(request.headers.get("authorization"))


# Version numbers count uploads; a bound keeps absurd values (2**70) away from the store's integer columns.
MAX_VERSION = 2**31 - 1
# Documented in the schema so clients (and fuzzers) know the rule; enforced by check_task_id (code invalid_task_id).
TASK_ID_SCHEMA = {"pattern": ID_PATTERN, "maxLength": ID_MAX_LENGTH}


def task_param(task: str = Query(..., description="task id", json_schema_extra=TASK_ID_SCHEMA)) -> str:
    return check_task_id(task)


def task_path(task: str = Path(..., description="task id", json_schema_extra=TASK_ID_SCHEMA)) -> str:
    return check_task_id(task)


def _raw_body(part: str, many: bool) -> dict:
    """Raw bytes, or a multipart body whose ``part`` is required (the handler answers 400 without it)."""
    binary = {"type": "string", "format": "binary"}
    field = {"type": "array", "items": binary, "minItems": 1, "maxItems": MAX_PARTS} if many else binary
    multipart = {"type": "object", "properties": {part: field}, "required": [part]}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": binary},
                "multipart/form-data": {"schema": multipart},
            },
        }
    }


CLASSIFY_BODY = _raw_body("image", many=True)
UPLOAD_BODY = _raw_body("file", many=False)


# -- health ---------------------------------------------------------------------------------------
@router.get("/healthz", response_model=schemas.Health, tags=["health"])
async def healthz(request: Request) -> JSONResponse:
    service = service_of(request)
    ok = service.alive
    body = {"status": "ok" if ok else "stalled", "detail": {"worker_heartbeat_age_s": round(service.heartbeat_age, 3)}}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/readyz", response_model=schemas.Health, tags=["health"])
async def readyz(request: Request) -> JSONResponse:
    detail = await run_in_threadpool(service_of(request).readiness)
    ready = detail.pop("ready")
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "detail": detail}, status_code=200 if ready else 503
    )


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(service_of(request).render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/backbone", response_model=schemas.BackboneResponse, tags=["backbone"])
async def backbone(request: Request) -> dict:
    service = service_of(request)
    limits = service.limits
    return {
        **service.backbone.info.to_dict(),
        "prompt_set_format": FORMAT,
        "limits": {
            "max_prompt_bytes": service.config.max_prompt_bytes,
            "max_classes": limits.max_classes,
            "max_prompt_length": limits.max_prompt_length,
            "max_pool_size": limits.max_pool_size,
        },
    }


# -- prompt sets ----------------------------------------------------------------------------------
@router.post(
    "/v1/prompts",
    status_code=201,
    response_model=schemas.PromptSetUploaded,
    responses={**ERRORS, 200: {"model": schemas.PromptSetUploaded, "description": "identical to the active version"}},
    openapi_extra=UPLOAD_BODY,
    tags=["prompts"],
)
async def upload_prompt_set(
    request: Request, response: Response, tenant: str = Depends(tenant_of), task: str = Depends(task_param)
) -> dict:
    """201 with a new active version; 200 with the active version when the bytes equal it (nothing changes)."""
    prompt_sets = service_of(request).prompt_sets
    limit = prompt_sets.max_bytes
    with prompt_sets.upload_slot():
        body = await read_capped(request, limit + 64 * 1024)
        data = (await multipart_files(request, "file", limit))[0] if is_multipart(request) else body
        uploaded = await run_in_threadpool(prompt_sets.upload, tenant, task, data)
    stored, ps = uploaded.stored, uploaded.prompt_set
    if not stored.new:
        response.status_code = 200
    return {
        "task": task,
        "version": stored.version,
        "new_version": stored.new,
        "sha256": stored.sha256,
        "size": stored.size,
        "created": stored.created,
        "num_classes": ps.num_classes,
        "num_params": ps.num_params,
        "pool_size": ps.pool_size,
        "prompt_length": ps.prompt_length,
        "share_blocks": ps.share_blocks,
        "top_k": ps.top_k,
        "backbone_fingerprint": ps.backbone_fingerprint,
    }


@router.get("/v1/prompts", response_model=schemas.TaskList, responses=ERRORS, tags=["prompts"])
async def list_prompt_sets(request: Request, tenant: str = Depends(tenant_of)) -> dict:
    summaries = await run_in_threadpool(service_of(request).prompt_sets.list, tenant)
    return {"tasks": [dataclasses.asdict(s) for s in summaries]}


@router.get("/v1/prompts/{task}", response_model=schemas.TaskDetail, responses=ERRORS, tags=["prompts"])
async def show_prompt_set(request: Request, tenant: str = Depends(tenant_of), task: str = Depends(task_path)) -> dict:
    detail = await run_in_threadpool(service_of(request).prompt_sets.show, tenant, task)
    return {
        "task": detail.task,
        "active_version": detail.active_version,
        "class_names": detail.class_names,
        "temperature": detail.temperature,
        "versions": [_version_info(v, active=v.version == detail.active_version) for v in detail.versions],
    }


@router.post("/v1/prompts/{task}/activate", response_model=schemas.VersionInfo, responses=ERRORS, tags=["prompts"])
async def activate_version(
    request: Request,
    tenant: str = Depends(tenant_of),
    task: str = Depends(task_path),
    version: int = Query(..., ge=1, le=MAX_VERSION),
) -> dict:
    info = await run_in_threadpool(service_of(request).prompt_sets.activate, tenant, task, version)
    return _version_info(info, active=True)


def _version_info(info: StoredVersion, active: bool) -> dict:
    """One version as ``show`` and ``activate`` answer it (``schemas.VersionInfo``)."""
    return {
        "version": info.version,
        "sha256": info.sha256,
        "size": info.size,
        "created": info.created,
        "active": active,
        "num_classes": meta_int(info, "num_classes"),
        "num_params": meta_int(info, "num_params"),
    }


@router.delete("/v1/prompts/{task}", response_model=schemas.Deleted, responses=ERRORS, tags=["prompts"])
async def delete_prompt_set(request: Request, tenant: str = Depends(tenant_of), task: str = Depends(task_path)) -> dict:
    await run_in_threadpool(service_of(request).prompt_sets.delete, tenant, task)
    return {"task": task, "deleted": True}


# -- classify -------------------------------------------------------------------------------------
@router.post(
    "/v1/classify",
    response_model=schemas.ClassifyResponse | schemas.ClassifyBatchResponse,
    responses={**ERRORS, 500: {"model": schemas.ErrorResponse}},
    openapi_extra=CLASSIFY_BODY,
    tags=["classify"],
)
async def classify(
    request: Request,
    tenant: str = Depends(tenant_of),
    task: str = Depends(task_param),
    top_k: int = Query(5, ge=1, le=100_000),
    version: int | None = Query(None, ge=1, le=MAX_VERSION),
) -> dict:
    service = service_of(request)
    multipart = is_multipart(request)
    limit = service.config.max_image_bytes

    async def read_images() -> list[bytes]:
        if multipart:
            await read_capped(request, limit * 8 + 64 * 1024)
            return await multipart_files(request, "image", limit)
        check_content_type(request.headers.get("content-type"))
        return [await read_capped(request, limit)]

    result = await service.classifier.classify(tenant, task, version, read_images, top_k)
    return _classification(result, multipart)


def _classification(result: Classification, multipart: bool) -> dict:
    """A raw body answers one image's predictions; a multipart body answers one result per image part."""
    preds = [[dataclasses.asdict(p) for p in image] for image in result.predictions]
    out = {"task": result.task, "version": result.version, "sha256": result.sha256}
    if multipart:
        return {**out, "results": [{"predictions": p} for p in preds]}
    return {**out, "predictions": preds[0]}
