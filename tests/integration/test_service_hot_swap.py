"""Hot swaps: new versions uploaded while classify traffic runs (no response mixes versions, no 5xx), and changes
made through one replica served by another replica on the same store within 1 s (embedded SQLite and Redis)."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

from tests.integration.service_helpers import assert_matches, classify, reference_probs, upload
from tests.support.images import image_bytes
from tests.support.prompt_sets import set_bytes
from tests.support.service_app import make_config, serve
from tests.support.waiting import wait_until_async as wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

IMG = image_bytes(seed=21)
REPLICA_DEADLINE_S = 1.0  # the promise: every replica serves a new version within 1 s


async def test_uploads_during_traffic_swap_atomically_without_errors(backbone, tmp_path):
    info = backbone.info
    # Versions differ in class count and pool size too, so a mixed-up row would not even have the right shape.
    versions = [set_bytes(info, classes=3 + v, pool=v % 4, seed=50 + v) for v in range(1, 6)]
    refs = {v: reference_probs(backbone, ps, IMG) for v, (ps, _) in enumerate(versions, start=1)}
    config = make_config(tmp_path, max_batch_size=8, max_wait_ms=2.0)
    async with serve(config, backbone) as (_app, c):
        assert (await upload(c, "live", versions[0][1])).json()["version"] == 1
        responses: list[httpx.Response] = []
        stop = anyio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                responses.append(await classify(c, "live", IMG))

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(traffic)
                await wait_until(lambda: len(responses) >= 4, 20, "traffic on version 1")
                for v, (_, data) in enumerate(versions[1:], start=2):
                    r = await upload(c, "live", data)
                    assert r.status_code == 201 and r.json()["version"] == v, r.text
                    mark = len(responses)
                    # The traffic itself switches to the new version (and stays there: no later upload yet).
                    await wait_until(
                        lambda v=v, mark=mark: any(x.json().get("version") == v for x in responses[mark:]),
                        10,
                        f"traffic answering with version {v}",
                    )
                stop.set()

        assert len(responses) > 8
        assert {r.status_code for r in responses} == {200}, {r.status_code for r in responses}
        seen = set()
        for r in responses:
            body = r.json()
            seen.add(body["version"])
            assert_matches(body["predictions"], refs[body["version"]])  # scores of exactly the version it names
        assert seen == set(refs)
        final = await classify(c, "live", IMG)
        assert final.json()["version"] == 5


async def _serves_version(client: httpx.AsyncClient, task: str, version: int | None, deadline_s: float) -> float:
    """Poll ``client`` until it answers ``task`` with ``version`` (None: 404); returns the seconds it took."""
    started = time.monotonic()
    last = None
    with anyio.move_on_after(deadline_s):
        while True:
            r = await classify(client, task, IMG)
            last = r
            if (version is None and r.status_code == 404) or (r.status_code == 200 and r.json()["version"] == version):
                return time.monotonic() - started
            assert r.status_code in (200, 404), r.text
            await anyio.sleep(0.02)
    raise AssertionError(f"replica B did not serve {task} v{version} within {deadline_s}s; last answer: {last.text}")


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_change_made_through_one_replica_is_served_by_another_within_a_second(
    backend, backbone, tmp_path, request
):
    if backend == "redis":
        spec = request.getfixturevalue("redis_server").url
    else:
        spec = str(tmp_path / "shared-store")
    info = backbone.info
    v1, d1 = set_bytes(info, classes=4, pool=2, seed=61)
    v2, d2 = set_bytes(info, classes=6, pool=3, seed=62)
    config_a = make_config(tmp_path / "a", store=spec, replica_id="a")
    config_b = make_config(tmp_path / "b", store=spec, replica_id="b")
    async with serve(config_a, backbone) as (_app_a, a), serve(config_b, backbone) as (_app_b, b):
        assert (await upload(a, "shared", d1)).status_code == 201
        r = await classify(b, "shared", IMG)  # B loads v1 from the store on first use
        assert r.status_code == 200 and r.json()["version"] == 1
        assert_matches(r.json()["predictions"], reference_probs(backbone, v1, IMG))

        # A new version uploaded through A: B, which already serves the task, swaps on the notification.
        assert (await upload(a, "shared", d2)).json()["version"] == 2
        await _serves_version(b, "shared", 2, REPLICA_DEADLINE_S)
        r = await classify(b, "shared", IMG)
        assert_matches(r.json()["predictions"], reference_probs(backbone, v2, IMG))

        # Rollback through A.
        assert (await a.post("/v1/prompts/shared/activate", params={"version": 1})).status_code == 200
        await _serves_version(b, "shared", 1, REPLICA_DEADLINE_S)
        assert_matches((await classify(b, "shared", IMG)).json()["predictions"], reference_probs(backbone, v1, IMG))

        # Delete through A: B stops serving it.
        assert (await a.delete("/v1/prompts/shared")).status_code == 200
        await _serves_version(b, "shared", None, REPLICA_DEADLINE_S)

        # A task B never served is read on its first use, and is listed by both.
        assert (await upload(a, "fresh", d2)).status_code == 201
        r = await classify(b, "fresh", IMG)
        assert r.status_code == 200 and r.json()["version"] == 1
        assert [t["task"] for t in (await b.get("/v1/prompts")).json()["tasks"]] == ["fresh"]


@pytest.mark.redis
async def test_a_version_that_cannot_be_loaded_is_never_replaced_by_the_old_one(backbone, tmp_path, redis_server):
    """Replica B gets the change notification but cannot read the new blob (its Redis user loses GET: a real
    server-side failure, not a mock): B answers 503 with Retry-After, never the version the store no longer holds
    active, and serves v2 once reads work again."""
    info = backbone.info
    _v1, d1 = set_bytes(info, classes=4, pool=2, seed=81)
    v2, d2 = set_bytes(info, classes=5, pool=3, seed=82)
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "replica-b", "on", ">replica-b-secret", "~*", "&*", "+@all")
    url_b = f"redis://replica-b:replica-b-secret@127.0.0.1:{redis_server.port}/0"
    config_a = make_config(tmp_path / "a", store=redis_server.url, replica_id="a")
    config_b = make_config(tmp_path / "b", store=url_b, replica_id="b", reconcile_s=0.5)
    async with serve(config_a, backbone) as (_app_a, a), serve(config_b, backbone) as (_app_b, b):
        assert (await upload(a, "flaky", d1)).status_code == 201
        assert (await classify(b, "flaky", IMG)).json()["version"] == 1

        admin.execute_command("ACL", "SETUSER", "replica-b", "-get")
        assert (await upload(a, "flaky", d2)).json()["version"] == 2
        await wait_until(
            lambda: b_knows_v2(_app_b), 10, "replica B to learn of v2"
        )  # the notification arrived; B's load of v2 fails from here on
        for _ in range(5):
            r = await classify(b, "flaky", IMG)
            assert r.status_code == 503 and r.headers["Retry-After"], r.text
            assert r.json()["error"]["code"] == "store_unavailable"

        admin.execute_command("ACL", "SETUSER", "replica-b", "+get")
        await _serves_version(b, "flaky", 2, 10.0)
        assert_matches((await classify(b, "flaky", IMG)).json()["predictions"], reference_probs(backbone, v2, IMG))
    admin.close()


def b_knows_v2(app) -> bool:
    state = app.state.lpt.prompt_sets.states.get("default", "flaky")
    return state is not None and state.active == 2
