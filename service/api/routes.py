"""HTTP endpoints. Typed errors are mapped to HTTP in one handler (``error_response``)."""

from __future__ import annotations

import asyncio
import time

import torch
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from lpt.errors import LptError, NotFound, TooLarge
from lpt.ids import check_task_id
from lpt.prompt_set import FORMAT, load_and_validate
from prompts_store.base import StoredVersion
from service.api import schemas
from service.api.body import MAX_PARTS, is_multipart, multipart_files, read_capped
from service.errors import RETRY_AFTER_S, DeadlineExceeded, ShuttingDown, http_status
from service.images import check_content_type
from service.queue import RowResult, WorkItem
from service.resident import ResidentSet
from service.state import ServiceState

router = APIRouter()

ERRORS = {code: {"model": schemas.ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 429, 503, 504)}


def error_response(exc: LptError) -> JSONResponse:
    status = http_status(exc)
    headers = {"Retry-After": RETRY_AFTER_S[status]} if status in RETRY_AFTER_S else None
    return JSONResponse({"error": exc.to_dict()}, status_code=status, headers=headers)


def state_of(request: Request) -> ServiceState:
    return request.app.state.lpt


def tenant_of(request: Request) -> str:
    return state_of(request).auth.tenant_for(request.headers.get("authorization"))


# Version numbers count uploads; a bound keeps absurd values (2**70) away from the store's integer columns.
MAX_VERSION = 2**31 - 1
# Documented in the schema so clients (and fuzzers) know the rule; enforced by check_task_id (code invalid_task_id).
TASK_ID_SCHEMA = {"pattern": "^[a-z0-9][a-z0-9._-]{0,63}$", "maxLength": 64}


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
    state = state_of(request)
    age = time.monotonic() - state.worker.heartbeat
    ok = state.worker.alive and age < max(5.0, 3 * state.config.request_timeout)
    body = {"status": "ok" if ok else "stalled", "detail": {"worker_heartbeat_age_s": round(age, 3)}}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/readyz", response_model=schemas.Health, tags=["health"])
async def readyz(request: Request) -> JSONResponse:
    state = state_of(request)
    store_ok = await run_in_threadpool(state.store_reachable)
    ready = state.warmed_up and not state.draining and (store_ok or len(state.cache) > 0)
    detail = {
        "warmed_up": state.warmed_up,
        "store": store_ok,
        "resident_sets": len(state.cache),
        "draining": state.draining,
    }
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "detail": detail}, status_code=200 if ready else 503
    )


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    state = state_of(request)
    state.refresh_gauges()
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/backbone", response_model=schemas.BackboneResponse, tags=["backbone"])
async def backbone(request: Request) -> dict:
    state = state_of(request)
    limits = state.limits
    return {
        **state.backbone.info.to_dict(),
        "prompt_set_format": FORMAT,
        "limits": {
            "max_prompt_bytes": state.config.max_prompt_bytes,
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
    state = state_of(request)
    limit = state.config.max_prompt_bytes
    body = await read_capped(request, limit + 64 * 1024)
    data = (await multipart_files(request, "file", limit))[0] if is_multipart(request) else body
    if len(data) > limit:
        raise TooLarge(message=f"prompt set of {len(data)} bytes exceeds the limit of {limit}", field="body")
    ps = await run_in_threadpool(load_and_validate, data, state.backbone.info, state.limits)
    meta = {"num_classes": str(ps.num_classes), "num_params": str(ps.num_params)}
    stored = await run_in_threadpool(state.store_call, state.store.put, tenant, task, data, meta)
    await run_in_threadpool(state.cache.install, stored, ps)
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
    state = state_of(request)

    def summaries() -> list[dict]:
        out = []
        for task in state.store_call(state.store.list_tasks, tenant):
            try:
                info = state.store_call(state.store.active_version, tenant, task)
            except NotFound:  # deleted between list and read
                continue
            out.append(
                {
                    "task": task,
                    "active_version": info.version,
                    "num_classes": _int_or_none(info.meta.get("num_classes")),
                }
            )
        return out

    return {"tasks": await run_in_threadpool(summaries)}


@router.get("/v1/prompts/{task}", response_model=schemas.TaskDetail, responses=ERRORS, tags=["prompts"])
async def show_prompt_set(request: Request, tenant: str = Depends(tenant_of), task: str = Depends(task_path)) -> dict:
    state = state_of(request)

    def detail() -> dict:
        active = state.store_call(state.store.active_version, tenant, task)
        versions = state.store_call(state.store.list_versions, tenant, task)
        return {
            "task": task,
            "active_version": active.version,
            "class_names": state.cache.class_names(tenant, task, active.version),  # metadata: nothing made resident
            "versions": [_version_info(v, active=v.version == active.version) for v in versions],
        }

    return await run_in_threadpool(detail)


@router.post("/v1/prompts/{task}/activate", response_model=schemas.VersionInfo, responses=ERRORS, tags=["prompts"])
async def activate_version(
    request: Request,
    tenant: str = Depends(tenant_of),
    task: str = Depends(task_path),
    version: int = Query(..., ge=1, le=MAX_VERSION),
) -> dict:
    state = state_of(request)
    info = await run_in_threadpool(state.store_call, state.store.activate, tenant, task, version)
    await run_in_threadpool(state.cache.activate, tenant, task, info.version)
    return _version_info(info, active=True)


def _version_info(info: StoredVersion, active: bool) -> dict:
    """One version as ``show`` and ``activate`` answer it (``schemas.VersionInfo``)."""
    return {
        "version": info.version,
        "sha256": info.sha256,
        "size": info.size,
        "created": info.created,
        "active": active,
        "num_classes": _int_or_none(info.meta.get("num_classes")),
        "num_params": _int_or_none(info.meta.get("num_params")),
    }


@router.delete("/v1/prompts/{task}", response_model=schemas.Deleted, responses=ERRORS, tags=["prompts"])
async def delete_prompt_set(request: Request, tenant: str = Depends(tenant_of), task: str = Depends(task_path)) -> dict:
    state = state_of(request)
    await run_in_threadpool(state.store_call, state.store.delete, tenant, task)
    state.cache.drop_task(tenant, task)
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
    state = state_of(request)
    if state.draining:
        raise ShuttingDown("the service is shutting down")
    deadline = time.monotonic() + state.config.request_timeout
    state.queue.check_room(tenant)  # an overloaded service says 429 before reading or decoding anything
    multipart = is_multipart(request)
    if not multipart:
        check_content_type(request.headers.get("content-type"))
    limit = state.config.max_image_bytes
    body = await read_capped(request, limit * 8 + 64 * 1024 if multipart else limit)
    blobs = await multipart_files(request, "image", limit) if multipart else [body]
    async with state.cache.use(tenant, task, version, deadline) as lease:
        images = await state.decode_pool.decode_all(blobs)
        # Each row holds its own lease until its future settles, however it settles (the queue's business).
        items = [WorkItem(tenant=tenant, image=img, lease=lease.share(), deadline=deadline) for img in images]
        state.queue.put_many(items)
        results = await _results(items, deadline)
    preds = [_predictions(r.probs, r.entry, top_k) for r in results]
    if multipart:
        return {"task": task, "version": lease.key.version, "results": [{"predictions": p} for p in preds]}
    return {"task": task, "version": lease.key.version, "predictions": preds[0]}


async def _results(items: list[WorkItem], deadline: float) -> list[RowResult]:
    try:
        return await asyncio.wait_for(
            asyncio.gather(*(asyncio.wrap_future(i.future) for i in items)),
            timeout=max(0.0, deadline - time.monotonic()),
        )
    except TimeoutError as exc:
        raise DeadlineExceeded("the request did not finish within its deadline") from exc


def _predictions(probs: torch.Tensor, entry: ResidentSet, top_k: int) -> list[dict]:
    k = min(top_k, probs.shape[0])
    scores, idx = probs.topk(k)
    names = entry.prompt_set.class_names
    return [
        {"index": int(i), "label": names[int(i)], "score": float(s)}
        for s, i in zip(scores.tolist(), idx.tolist(), strict=True)
    ]


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
