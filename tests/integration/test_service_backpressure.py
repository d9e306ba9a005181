"""Backpressure and failure paths through the real app: a full queue answers 429 with Retry-After, a deadline 504,
a failing forward fails every request of its batch (and only that batch); single-flight loads and LRU eviction of
the device prompt cache."""

from __future__ import annotations

import anyio
import httpx
import pytest
import torch

from lpt.forward import precompute_shared_kv
from prompts_store import open_store
from prompts_store.base import StoredVersion
from service.app import create_app
from service.resident import make_resident
from tests.integration.service_helpers import (
    CountingStore,
    GatedInfer,
    assert_matches,
    classify,
    reference_probs,
    upload,
)
from tests.support.images import image_bytes
from tests.support.prompt_sets import set_bytes
from tests.support.service_app import KEYS, error_code, make_config, metrics, open_leases, serve, state_of
from tests.support.waiting import wait_until_async

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

IMG = image_bytes(seed=5)


def assert_no_leases(app) -> None:
    """Every lease taken by a request was given back."""
    leases = open_leases(state_of(app))
    assert all(n == 0 for n in leases.values()), leases


async def test_full_queue_answers_429_with_retry_after(backbone, tmp_path):
    config = make_config(tmp_path, queue_size=2, max_batch_size=1, max_wait_ms=1.0, request_timeout=30.0)
    _, data = set_bytes(backbone.info, seed=1)
    async with serve(config, backbone) as (app, c):
        assert (await upload(c, "t", data)).status_code == 201
        gate = GatedInfer(state_of(app))
        queue = state_of(app).classifier.queue
        results: dict[int, httpx.Response] = {}

        async def send(i: int) -> None:
            results[i] = await classify(c, "t", IMG)

        try:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send, 0)  # taken by the worker, which then blocks inside the forward
                    await wait_until_async(gate.entered.is_set, 10, "the worker to block in the forward")
                    tg.start_soon(send, 1)
                    tg.start_soon(send, 2)
                    await wait_until_async(lambda: len(queue) == 2, 10, "two requests waiting in the queue")

                    full = await classify(c, "t", IMG)
                    assert full.status_code == 429, full.text
                    assert error_code(full) == "queue_full"
                    assert int(full.headers["Retry-After"]) >= 1
                    m = await metrics(c)
                    assert m["lpt_queue_depth"] == 2
                    assert m['lpt_requests_total{endpoint="/v1/classify",status="429"}'] == 1
                    gate.release.set()
        finally:
            gate.release.set()
        assert [results[i].status_code for i in range(3)] == [200, 200, 200]
        assert (await classify(c, "t", IMG)).status_code == 200
        assert_no_leases(app)


async def test_deadline_answers_504_and_the_service_recovers(backbone, tmp_path):
    config = make_config(tmp_path, max_batch_size=1, max_wait_ms=1.0, request_timeout=1.0)
    ps, data = set_bytes(backbone.info, seed=1)
    async with serve(config, backbone) as (app, c):
        assert (await upload(c, "t", data)).status_code == 201
        gate = GatedInfer(state_of(app))
        results: dict[int, httpx.Response] = {}

        async def send(i: int) -> None:
            results[i] = await classify(c, "t", IMG)

        try:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send, 0)  # stuck in the blocked forward
                    await wait_until_async(gate.entered.is_set, 10, "the worker to block in the forward")
                    tg.start_soon(send, 1)  # stuck in the queue behind it
        finally:
            gate.release.set()
        for i in (0, 1):
            assert results[i].status_code == 504, results[i].text
            assert error_code(results[i]) == "deadline_exceeded"

        # The worker finishes the abandoned batch, drops the expired request, and serves the next one.
        r = await classify(c, "t", IMG)
        assert r.status_code == 200, r.text
        assert_matches(r.json()["predictions"], reference_probs(backbone, ps, IMG))
        await wait_until_async(lambda: len(state_of(app).classifier.queue) == 0, 10, "the queue to drain")
        assert_no_leases(app)
        m = await metrics(c)
        assert m['lpt_requests_total{endpoint="/v1/classify",status="504"}'] == 2


async def test_a_failing_forward_fails_its_whole_batch_with_500_and_the_next_batch_works(backbone, tmp_path):
    config = make_config(tmp_path, max_batch_size=3, max_wait_ms=3000.0, request_timeout=20.0)
    sets = [set_bytes(backbone.info, classes=3 + i, pool=i, seed=i) for i in range(3)]
    async with serve(config, backbone) as (app, c):
        for i, (_, data) in enumerate(sets):
            assert (await upload(c, f"t{i}", data)).status_code == 201
        gate = GatedInfer(state_of(app), gate=False)
        gate.fail_next = True
        results: dict[int, httpx.Response] = {}

        async def send(i: int) -> None:
            results[i] = await classify(c, f"t{i}", IMG)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(send, i)
        assert gate.calls == 1  # the three requests were one batch
        for i in range(3):
            assert results[i].status_code == 500, results[i].text
            assert results[i].headers["content-type"].startswith("application/json")
            assert error_code(results[i]) == "batch_failed"

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(send, i)
        assert gate.calls == 2
        for i, (ps, _) in enumerate(sets):
            assert results[i].status_code == 200, results[i].text
            assert_matches(results[i].json()["predictions"], reference_probs(backbone, ps, IMG))
        assert state_of(app).worker.alive
        assert_no_leases(app)


async def test_a_cold_task_under_100_concurrent_requests_is_read_from_the_store_once(backbone, tmp_path):
    config = make_config(tmp_path, max_batch_size=32, max_wait_ms=5.0, request_timeout=30.0)
    inner = open_store(config.store)
    ps, data = set_bytes(backbone.info, classes=6, pool=3, seed=9)
    inner.put("default", "cold", data, {"num_classes": "6"})
    store = CountingStore(inner)
    try:
        async with serve(config, backbone, store=store) as (app, c):
            assert not state_of(app).prompt_sets.cache.resident_keys("default", "cold")  # not resident: cold
            results: list[httpx.Response] = []

            async def send() -> None:
                results.append(await classify(c, "cold", IMG))

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for _ in range(100):
                        tg.start_soon(send)
            assert [r.status_code for r in results] == [200] * 100
            assert store.calls["get"] == 1, store.calls
            expected = reference_probs(backbone, ps, IMG)
            for r in results:
                assert_matches(r.json()["predictions"], expected)
            m = await metrics(c)
            assert m["lpt_prompt_cache_misses_total"] == 1
            assert m["lpt_prompt_cache_hits_total"] >= 99
            assert m["lpt_prompt_load_duration_seconds_count"] == 1
            assert_no_leases(app)
    finally:
        inner.close()


async def test_identical_reuploads_under_classify_traffic_keep_the_cache_within_its_budget(backbone, tmp_path):
    """Budget of 2.5 sets, six tasks; four of them get classify traffic (active and by number) while their
    identical bytes are re-uploaded. Re-uploads name versions that are resident and leased: nothing may be
    replaced, so every lease is given back and the LRU brings the cache back within its budget."""
    info = backbone.info
    sets = {f"t{i}": set_bytes(info, classes=4, pool=3, seed=10 + i) for i in range(6)}
    # a resident set's bytes: its tensors plus its shared-prompt keys/values
    one_set = make_resident(
        StoredVersion("t", "t0", 1, "", 0, 0.0), sets["t0"][0], "cpu", torch.float32, backbone.model
    ).nbytes
    config = make_config(
        tmp_path, cache_bytes=int(2.5 * one_set), max_prompt_bytes=2 * one_set, max_batch_size=4, max_wait_ms=5.0
    )
    busy = ["t0", "t1", "t2", "t3"]
    async with serve(config, backbone) as (app, c):
        for task, (_ps, data) in sets.items():
            assert (await upload(c, task, data)).status_code == 201
        answers: list[httpx.Response] = []

        async def traffic(task: str) -> None:
            for i in range(6):
                answers.append(await classify(c, task, IMG, version=1 if i % 2 else None))

        async def reupload(task: str) -> None:
            for _ in range(4):
                answers.append(await upload(c, task, sets[task][1]))
                await anyio.sleep(0)

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for task in busy:
                    tg.start_soon(traffic, task)
                    tg.start_soon(reupload, task)
        assert {r.status_code for r in answers} == {200}, [(r.status_code, r.text) for r in answers if r.is_error]
        cache = state_of(app).prompt_sets.cache
        await wait_until_async(lambda: all(n == 0 for n in open_leases(state_of(app)).values()), 10, "every lease back")
        assert cache.resident_bytes <= config.cache_bytes, (len(cache), cache.resident_bytes / one_set)
        for task, (ps, _data) in sets.items():  # every task still servable, with its own scores
            r = await classify(c, task, IMG)
            assert r.status_code == 200 and r.json()["version"] == 1, r.text
            assert_matches(r.json()["predictions"], reference_probs(backbone, ps, IMG))
        assert_no_leases(app)
        assert cache.resident_bytes <= config.cache_bytes and len(cache) == 2
        assert (await metrics(c))["lpt_prompt_cache_bytes"] <= config.cache_bytes


async def test_eviction_under_a_small_cache_budget_then_reload_gives_identical_results(backbone, tmp_path):
    info = backbone.info
    sets = {name: set_bytes(info, classes=5, pool=3, seed=seed) for name, seed in (("a", 1), ("b", 2))}
    # float32 on the CPU: the resident size is the set's tensors plus its shared-prompt keys/values
    one_set = sets["a"][0].nbytes + precompute_shared_kv(backbone.model, sets["a"][0]).nbytes
    budget = one_set + one_set // 2  # room for one set, not two
    config = make_config(tmp_path, cache_bytes=budget, max_prompt_bytes=budget)
    async with serve(config, backbone) as (app, c):
        cache = state_of(app).prompt_sets.cache
        assert (await upload(c, "a", sets["a"][1])).status_code == 201
        first = await classify(c, "a", IMG)
        assert first.status_code == 200
        evictions0 = (await metrics(c))["lpt_prompt_cache_evictions_total"]

        assert (await upload(c, "b", sets["b"][1])).status_code == 201  # resident now: a is evicted
        assert (await classify(c, "b", IMG)).status_code == 200
        assert len(cache) == 1 and cache.resident_bytes <= config.cache_bytes
        m = await metrics(c)
        assert m["lpt_prompt_cache_evictions_total"] == evictions0 + 1
        assert m["lpt_prompt_cache_resident_sets"] == 1 and m["lpt_prompt_cache_bytes"] <= config.cache_bytes

        misses0 = m["lpt_prompt_cache_misses_total"]
        again = await classify(c, "a", IMG)  # reloaded from the store, evicting b
        assert again.status_code == 200 and again.json()["version"] == 1
        assert again.json()["predictions"] == first.json()["predictions"]
        assert_matches(again.json()["predictions"], reference_probs(backbone, sets["a"][0], IMG))
        m = await metrics(c)
        assert m["lpt_prompt_cache_misses_total"] == misses0 + 1
        assert m["lpt_prompt_cache_evictions_total"] == evictions0 + 2
        assert len(cache) == 1
        assert_no_leases(app)


async def test_one_tenant_flooding_does_not_starve_another(backbone, tmp_path):
    config = make_config(
        tmp_path, api_keys=KEYS, max_batch_size=4, max_wait_ms=1.0, queue_size=100, request_timeout=30.0
    )
    _, data = set_bytes(backbone.info, seed=1)
    async with serve(config, backbone) as (app, c):
        for tenant in KEYS:
            assert (await upload(c, "t", data, tenant=tenant)).status_code == 201
        gate = GatedInfer(state_of(app))
        queue = state_of(app).classifier.queue
        statuses: list[int] = []

        async def send(tenant: str) -> None:
            statuses.append((await classify(c, "t", IMG, tenant=tenant)).status_code)

        try:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send, "acme")
                    await wait_until_async(gate.entered.is_set, 10, "the worker to block in the forward")
                    for _ in range(30):  # acme floods the queue ...
                        tg.start_soon(send, "acme")
                    await wait_until_async(lambda: len(queue) == 30, 10, "acme's flood in the queue")
                    tg.start_soon(send, "globex")  # ... then globex sends one request, behind all of them
                    await wait_until_async(lambda: len(queue) == 31, 10, "globex's request in the queue")
                    gate.release.set()
        finally:
            gate.release.set()
        assert statuses == [200] * 32
        # Round-robin over per-tenant queues: globex rides in the very next batch, not after acme's 30.
        assert "globex" in gate.batches[1], gate.batches
        assert sum(len(b) for b in gate.batches) == 32


async def test_shutdown_past_its_timeout_answers_queued_requests_503_and_finishes_the_running_batch(backbone, tmp_path):
    config = make_config(tmp_path, max_batch_size=1, max_wait_ms=1.0, request_timeout=30.0, shutdown_timeout=0.3)
    _, data = set_bytes(backbone.info, seed=1)
    app = create_app(config, backbone=backbone)
    lifespan = app.router.lifespan_context(app)
    with anyio.fail_after(60):
        await lifespan.__aenter__()
    gate = GatedInfer(state_of(app))
    results: dict[int, httpx.Response] = {}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await upload(c, "t", data)).status_code == 201

            async def send(i: int) -> None:
                results[i] = await classify(c, "t", IMG)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send, 0)  # running (blocked in the forward) when shutdown starts
                    await wait_until_async(gate.entered.is_set, 10, "the worker to block in the forward")
                    tg.start_soon(send, 1)
                    tg.start_soon(send, 2)
                    await wait_until_async(lambda: len(state_of(app).classifier.queue) == 2, 10, "two queued requests")
                    await lifespan.__aexit__(None, None, None)  # the worker cannot drain them in 0.3 s
                    gate.release.set()
    finally:
        gate.release.set()
    assert results[0].status_code == 200, results[0].text
    for i in (1, 2):
        assert results[i].status_code == 503, results[i].text
        assert error_code(results[i]) == "shutting_down" and "Retry-After" in results[i].headers
