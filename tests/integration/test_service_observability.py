"""/healthz, /readyz, /metrics (every contract metric name, no per-task label), /v1/backbone, and the OpenAPI
schema served without the internet."""

from __future__ import annotations

import re
import time

import anyio
import pytest

from service.app import ENDPOINTS
from tests.integration.service_helpers import GatedInfer, classify, upload
from tests.support.images import image_bytes
from tests.support.prompt_sets import set_bytes
from tests.support.service_app import make_config, metrics, serve, state_of
from tests.support.waiting import wait_until_async

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

# Metric names are a contract for dashboards; counters carry the exposition's ``_total``.
CONTRACT_METRICS = [
    "lpt_requests_total",
    "lpt_request_duration_seconds",
    "lpt_queue_wait_seconds",
    "lpt_batch_size",
    "lpt_batch_tasks",
    "lpt_inference_duration_seconds",
    "lpt_queue_depth",
    "lpt_prompt_cache_hits_total",
    "lpt_prompt_cache_misses_total",
    "lpt_prompt_cache_evictions_total",
    "lpt_prompt_cache_resident_sets",
    "lpt_prompt_cache_bytes",
    "lpt_prompt_load_duration_seconds",
    "lpt_store_errors_total",
    "lpt_store_corrupt_total",
    "lpt_batch_failures_total",
    "lpt_device_memory_bytes",
]


async def test_health_readiness_and_every_contract_metric(backbone, tmp_path):
    _, data = set_bytes(backbone.info, seed=1)
    async with serve(make_config(tmp_path), backbone) as (_app, c):
        r = await c.get("/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = await c.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready", r.text
        assert r.json()["detail"]["warmed_up"] is True and r.json()["detail"]["store"] is True

        assert (await upload(c, "t", data)).status_code == 201
        assert (await classify(c, "t", image_bytes(seed=1))).status_code == 200
        assert (await classify(c, "nope", image_bytes(seed=1))).status_code == 404

        r = await c.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        m = await metrics(c)
        names = {key.split("{")[0] for key in m}
        for name in CONTRACT_METRICS:
            present = name in names or f"{name}_count" in names  # histograms expose _count/_sum/_bucket
            assert present, f"metric {name} missing from /metrics"
        assert m['lpt_requests_total{endpoint="/v1/classify",status="200"}'] == 1
        assert m['lpt_requests_total{endpoint="/v1/classify",status="404"}'] == 1
        assert m['lpt_requests_total{endpoint="/v1/prompts",status="201"}'] == 1
        assert m['lpt_request_duration_seconds_count{endpoint="/v1/classify"}'] == 2
        assert m["lpt_queue_wait_seconds_count"] == 1 and m["lpt_inference_duration_seconds_count"] == 1
        assert m["lpt_prompt_cache_resident_sets"] == 1 and m["lpt_prompt_cache_bytes"] > 0
        # No per-task labels anywhere (tasks are unbounded): only fixed label names.
        labels = {part.split("=")[0] for key in m if "{" in key for part in key[key.index("{") + 1 : -1].split(",")}
        assert labels <= {"endpoint", "status", "le", "name", "fingerprint", "tenant", "stage"}, labels
        assert m['lpt_batch_failures_total{stage="forward"}'] == m['lpt_batch_failures_total{stage="loop"}'] == 0
        assert not any('"t"' in key or '"nope"' in key for key in m)

        r = await c.get("/v1/backbone")
        assert r.status_code == 200
        info = r.json()
        assert info["name"] == "test_vit" and info["fingerprint"] == backbone.info.fingerprint
        assert info["depth"] == 6 and info["embed_dim"] == 64 and info["input_size"] == [3, 32, 32]
        assert len(info["mean"]) == len(info["std"]) == 3
        assert set(info) == {*backbone.info.to_dict(), "prompt_set_format", "limits"}  # the schema drops nothing

        r = await c.get("/no/such/route")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_healthz_reports_a_stalled_worker(backbone, tmp_path):
    config = make_config(tmp_path, request_timeout=0.5, max_batch_size=1)
    _, data = set_bytes(backbone.info, seed=1)
    async with serve(config, backbone) as (app, c):
        assert (await upload(c, "t", data)).status_code == 201
        gate = GatedInfer(state_of(app), wait_s=20.0)
        try:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(classify, c, "t", image_bytes(seed=1))
                    await wait_until_async(gate.entered.is_set, 10, "the worker to block")
                    # The heartbeat stops while the forward hangs; /healthz turns 503 once it is older than 5 s.
                    worker = state_of(app).worker
                    await wait_until_async(lambda: time.monotonic() - worker.heartbeat > 5.2, 10, "a 5 s old heartbeat")
                    r = await c.get("/healthz")
                    assert r.status_code == 503 and r.json()["status"] == "stalled", r.text
                    gate.release.set()
        finally:
            gate.release.set()
        await wait_until_async(lambda: time.monotonic() - worker.heartbeat < 1.0, 10, "the worker to beat again")
        assert (await c.get("/healthz")).status_code == 200


async def test_openapi_schema_is_served_offline(backbone, tmp_path):
    async with serve(make_config(tmp_path), backbone) as (_app, c):
        r = await c.get("/openapi.json")
        assert r.status_code == 200
        schema = r.json()
        assert schema["openapi"].startswith("3.")
        paths = set(schema["paths"])
        own = {e for e in ENDPOINTS if not e.startswith("/v2")}  # the Open Inference Protocol has its own spec
        assert paths >= own, own - paths
        assert {"post"} <= set(schema["paths"]["/v1/classify"]) and {"post"} <= set(schema["paths"]["/v1/prompts"])
        body = schema["paths"]["/v1/prompts"]["post"]["requestBody"]["content"]
        assert "application/octet-stream" in body and "multipart/form-data" in body
        # /docs must render offline: every asset its HTML references is served by the app itself.
        r = await c.get("/docs")
        assert r.status_code == 200 and "/openapi.json" in r.text
        assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        assert assets and all(a.startswith("/") for a in assets), assets
        for asset in assets:
            got = await c.get(asset)
            assert got.status_code == 200 and len(got.content) > 100, asset


async def test_redoc_leads_to_the_offline_docs(backbone, tmp_path):
    """ReDoc would load its script and fonts from CDNs; /redoc sends readers to the offline Swagger UI instead."""
    async with serve(make_config(tmp_path), backbone) as (_app, c):
        r = await c.get("/redoc")
        assert r.status_code == 308 and r.headers["location"] == "/docs", r.text
        page = (await c.get("/redoc", follow_redirects=True)).text
        assert "/docs-static/swagger-ui-bundle.js" in page
        assert not re.search(r"https?://", page), "the docs page must not load anything from another host"
