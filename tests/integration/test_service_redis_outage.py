"""The Redis store going away under traffic (a real redis-server, killed with SIGKILL): resident tasks keep
answering 200, uploads answer 503 with Retry-After, and after a restart uploads succeed again within 10 s."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

from tests.integration.service_helpers import assert_matches, classify, reference_probs, upload
from tests.support.images import image_bytes
from tests.support.prompt_sets import set_bytes
from tests.support.service_app import error_code, make_config, metrics, serve

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120), pytest.mark.redis]

IMG = image_bytes(seed=31)
RECOVERY_S = 10.0  # the promise: after a Redis restart, uploads succeed again within 10 s


async def test_redis_killed_during_traffic(backbone, tmp_path, redis_server):
    info = backbone.info
    sets = {task: set_bytes(info, classes=3 + i, pool=i, seed=70 + i) for i, task in enumerate(("hot", "warm"))}
    refs = {(task, 1): reference_probs(backbone, ps, IMG) for task, (ps, _) in sets.items()}
    new_set, new_bytes = set_bytes(info, classes=5, pool=2, seed=79)
    refs[("hot", 2)] = reference_probs(backbone, new_set, IMG)
    config = make_config(tmp_path, store=redis_server.url, store_timeout=0.5, max_wait_ms=2.0)
    async with serve(config, backbone) as (_app, c):
        for task, (_, data) in sets.items():
            assert (await upload(c, task, data)).status_code == 201
            assert (await classify(c, task, IMG)).status_code == 200
        responses: list[tuple[str, httpx.Response]] = []
        stop = anyio.Event()

        async def traffic(task: str) -> None:
            while not stop.is_set():
                responses.append((task, await classify(c, task, IMG)))
                await anyio.sleep(0.005)

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for task in sets:
                    tg.start_soon(traffic, task)
                await anyio.sleep(0.1)

                redis_server.kill()
                killed_at = len(responses)
                r = await upload(c, "hot", new_bytes)
                assert r.status_code == 503, r.text
                assert error_code(r) == "store_unavailable"
                assert int(r.headers["Retry-After"]) >= 1
                r = await upload(c, "brand-new", new_bytes)
                assert r.status_code == 503 and "Retry-After" in r.headers
                for req in (c.get("/v1/prompts"), c.get("/v1/prompts/hot")):
                    r = await req
                    assert r.status_code == 503 and error_code(r) == "store_unavailable", r.text
                ready = await c.get("/readyz")  # the store is down but the cache is warm: still ready
                assert ready.status_code == 200, ready.text
                assert ready.json()["detail"]["store"] is False
                await anyio.sleep(0.5)  # traffic keeps flowing while Redis is dead
                during = len(responses) - killed_at
                assert during > 0
                assert (await metrics(c))["lpt_store_errors_total"] >= 2

                redis_server.restart()
                started = time.monotonic()
                while True:
                    before_v2 = len(responses)
                    r = await upload(c, "hot", new_bytes)
                    if r.status_code == 201:
                        break
                    assert r.status_code == 503, r.text
                    assert time.monotonic() - started < RECOVERY_S, "uploads did not recover within 10 s"
                    await anyio.sleep(0.1)
                assert r.json()["version"] == 2  # AOF replayed: v1 survived the kill
                stop.set()

        assert {r.status_code for _, r in responses} == {200}
        for i, (task, r) in enumerate(responses):
            version = r.json()["version"]
            assert version == 1 or (task == "hot" and i >= before_v2), (task, i, version)
            assert_matches(r.json()["predictions"], refs[(task, version)])
        r = await classify(c, "hot", IMG)
        assert r.status_code == 200 and r.json()["version"] == 2
        assert (await upload(c, "brand-new", new_bytes)).status_code == 201
