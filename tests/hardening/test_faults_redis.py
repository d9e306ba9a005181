"""Redis faults under a running service (a real redis-server with a password, AOF on).

For each fault (kill -9, SIGSTOP, CLIENT PAUSE): classify of cached tasks keeps answering 200; uploads answer 503
with Retry-After within the configured store timeout (plus a small scheduling margin); /readyz reports the store
as down, and reports it back up within 10 s of Redis returning, when uploads succeed again. Uploads acknowledged
(201) while Redis is killed with -9 mid-stream are all there after the restart. The Redis password never reaches
the logs. (tests/integration/test_service_redis_outage.py covers a kill during mixed traffic with version checks.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest

from prompts_store import open_store
from tests.support.images import png_bytes
from tests.support.prompt_sets import prompt_bytes
from tests.support.redis_server import RedisServer, running_redis
from tests.support.service_app import error_code, make_config, serve_in_thread
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

STORE_TIMEOUT = 0.5
MARGIN = 1.0  # thread-pool hop, validation of the upload, a loaded 2-core CI box
RECOVERY_S = 10.0
PASSWORD = "redis-hardening-pw-7f3a9c"


@pytest.fixture
def redis_pw(tmp_path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis", password=PASSWORD) as srv:
        yield srv


def classify(served, task: str):
    return served.post(f"/v1/classify?task={task}", content=png_bytes(), headers={"content-type": "image/png"})


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def readyz(served) -> tuple[int, dict]:
    r = served.get("/readyz")
    return r.status_code, r.json()["detail"]


class ClientPause:
    """CLIENT PAUSE ALL for a fixed time. Redis holds every command while paused, CLIENT UNPAUSE and AUTH
    included, so the fault heals when the pause expires."""

    MS = 5000

    def __init__(self) -> None:
        self.until = 0.0

    def inject(self, srv: RedisServer) -> None:
        srv.client_pause(self.MS, "ALL")
        self.until = time.monotonic() + self.MS / 1000

    def heal(self, _srv: RedisServer) -> None:
        time.sleep(max(0.0, self.until - time.monotonic()) + 0.05)


_pause = ClientPause()


def upload_healthy(served, task: str, data: bytes) -> None:
    """Set-up upload with Redis healthy; retried, since a loaded box can miss the 0.5 s socket timeout."""
    wait_until(lambda: served.post(f"/v1/prompts?task={task}", content=data).status_code == 201, 10, f"upload {task}")


FAULTS = {
    "kill": (lambda srv: srv.kill(), lambda srv: srv.restart()),
    "sigstop": (lambda srv: srv.pause(), lambda srv: srv.resume()),
    "client-pause": (_pause.inject, _pause.heal),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_redis_fault_keeps_cached_tasks_serving_and_fails_uploads_fast(backbone, tmp_path, redis_pw, fault, caplog):
    caplog.set_level(logging.INFO)
    inject, heal = FAULTS[fault]
    config = make_config(tmp_path, store=redis_pw.url, store_timeout=STORE_TIMEOUT, reconcile_s=0.5)
    info = backbone.info
    with serve_in_thread(config, backbone) as s:
        for task, seed in (("hot", 1), ("warm", 2)):
            upload_healthy(s, task, prompt_bytes(info, seed=seed))
            assert classify(s, task).status_code == 200
        assert readyz(s) == (
            200,
            {"warmed_up": True, "store": True, "resident_sets": 2, "draining": False, "failing_batches": 0},
        )

        inject(redis_pw)
        try:
            for _ in range(3):
                for task in ("hot", "warm"):
                    r, elapsed = timed(classify, s, task)
                    assert r.status_code == 200, r.text
                    assert elapsed < 2.0  # never waits on the store
            for task in ("hot", "brand-new"):
                r, elapsed = timed(lambda t: s.post(f"/v1/prompts?task={t}", content=prompt_bytes(info, seed=5)), task)
                assert r.status_code == 503, r.text
                assert error_code(r) == "store_unavailable"
                assert int(r.headers["Retry-After"]) >= 1
                assert elapsed < STORE_TIMEOUT + MARGIN, f"upload took {elapsed:.2f} s to fail"
            time.sleep(1.1)  # past the readiness probe's one-second ping cache
            (status, detail), elapsed = timed(readyz, s)
            assert detail["store"] is False, detail
            assert status == 200  # still ready: the cache is warm, so the replica can serve
            assert elapsed < STORE_TIMEOUT + MARGIN
            assert classify(s, "hot").status_code == 200
        finally:
            heal(redis_pw)

        back = wait_until(lambda: readyz(s)[1]["store"] is True, RECOVERY_S, "/readyz reporting the store back")
        remaining = RECOVERY_S - back
        wait_until(
            lambda: s.post("/v1/prompts?task=hot", content=prompt_bytes(info, seed=6)).status_code == 201,
            remaining,
            "an upload succeeding again",
        )
        assert s.get("/v1/prompts/hot").json()["active_version"] == 2
        # Reconcile passes after the recovery (every reconcile_s) may deliver the version from before the
        # upload; the replica confirms events with the store, so the upload serves from its answer on.
        served = set()
        until = time.monotonic() + 4 * 0.5
        while time.monotonic() < until:
            served.add(classify(s, "hot").json()["version"])
        assert served == {2}
        assert classify(s, "warm").status_code == 200
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert PASSWORD not in logged


def test_cold_replica_with_redis_down_is_not_ready(backbone, tmp_path, redis_pw):
    config = make_config(tmp_path, store=redis_pw.url, store_timeout=STORE_TIMEOUT)
    with serve_in_thread(config, backbone) as s:
        assert readyz(s)[0] == 200
        redis_pw.pause()
        try:
            time.sleep(1.1)
            status, detail = readyz(s)
            assert status == 503 and detail["store"] is False and detail["resident_sets"] == 0
            r, elapsed = timed(classify, s, "anything")
            assert r.status_code == 503 and error_code(r) == "store_unavailable", r.text
            assert elapsed < STORE_TIMEOUT + MARGIN
        finally:
            redis_pw.resume()
        wait_until(lambda: readyz(s)[0] == 200, RECOVERY_S, "/readyz turning ready")


def test_no_acknowledged_upload_is_lost_when_redis_is_killed(backbone, tmp_path, redis_pw):
    config = make_config(tmp_path, store=redis_pw.url, store_timeout=STORE_TIMEOUT)
    info = backbone.info
    acked: dict[str, tuple[int, str]] = {}
    failed: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    with serve_in_thread(config, backbone) as s:

        def uploader() -> None:
            i = 0
            try:
                while not stop.is_set():
                    tasks = [f"t{i + j}" for j in range(4)]
                    calls = [
                        ("POST", f"/v1/prompts?task={t}", {"content": prompt_bytes(info, seed=i + j)})
                        for j, t in enumerate(tasks)
                    ]
                    for task, r in zip(tasks, s.gather(calls), strict=True):
                        assert not isinstance(r, BaseException), r
                        if r.status_code == 201:
                            acked[task] = (r.json()["version"], r.json()["sha256"])
                        else:
                            assert r.status_code == 503, r.text
                            failed.append(i)
                    i += 4
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=uploader, daemon=True)
        thread.start()
        wait_until(lambda: len(acked) >= 12, 30, "12 acknowledged uploads")
        redis_pw.kill()  # kill -9 while uploads are in flight
        wait_until(lambda: len(failed) >= 4, 10, "uploads failing while Redis is dead")
        redis_pw.restart()
        count = len(acked)
        wait_until(lambda: len(acked) >= count + 8, 15, "uploads succeeding after the restart")
        stop.set()
        thread.join(30)
        assert not errors, errors

        # Every acknowledged version is there, read through a fresh client and through the API.
        fresh = open_store(redis_pw.url)
        try:
            for task, (version, sha) in acked.items():
                stored = fresh.active_version("default", task)
                assert (stored.version, stored.sha256) == (version, sha), task
            assert len(acked) >= 20
        finally:
            fresh.close()
        listed = {t["task"]: t["active_version"] for t in s.get("/v1/prompts").json()["tasks"]}
        assert all(listed.get(task) == version for task, (version, _) in acked.items())
