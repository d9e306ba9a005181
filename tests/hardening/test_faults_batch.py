"""An exception inside a batch, for the cases the single-image test in
tests/integration/test_service_backpressure.py does not reach: a multi-image request whose rows are split over a
failing batch and a succeeding one, a failure that repeats for several batches, and a failure in the batch loop
outside the forward. Every such request answers 5xx (never a partial result), nothing hangs, no lease leaks, and
the next batch works.

The forward fault is real: a forward hook on the backbone's patch embedding raises inside the engine's forward
pass. The loop fault raises in the worker's own bookkeeping after a successful forward.
"""

from __future__ import annotations

import threading

import pytest

from lpt.backbone import load_backbone
from tests.support.images import png_bytes
from tests.support.metrics import parse_metrics
from tests.support.prompt_sets import prompt_bytes
from tests.support.service_app import error_code, make_config, open_leases, serve_in_thread
from tests.support.waiting import wait_until


class FailingForward:
    """Raises inside the model's forward while armed; counts the rows it saw."""

    def __init__(self, model) -> None:
        self.armed = threading.Event()
        self.fail_next = 0
        self.rows_failed = 0
        self.calls = 0
        self._lock = threading.Lock()
        self.handle = model.patch_embed.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        with self._lock:
            self.calls += 1
            if self.armed.is_set() or self.fail_next > 0:
                self.fail_next = max(0, self.fail_next - 1)
                self.rows_failed += int(args[0].shape[0])
                raise RuntimeError("injected device fault (CUDA error: an illegal memory access was encountered)")


@pytest.fixture
def own_backbone():
    # Its own instance: the hook must not leak into other tests' shared backbone.
    return load_backbone("test_vit", "random:0", img_size=32)


def image(seed: int) -> bytes:
    return png_bytes((40, 40), color=(seed * 40 % 256, 100, 200))


def multipart(n: int) -> dict:
    return {"files": [("image", (f"{i}.png", image(i), "image/png")) for i in range(n)]}


def assert_no_leases(served, within_s: float = 5.0) -> None:
    """Every resident set is unleased (waiting, bounded, for rows still settling in the worker)."""

    def settled() -> bool:
        leases = open_leases(served.state)
        return bool(leases) and all(n == 0 for n in leases.values())

    wait_until(settled, within_s, "every lease back", interval=0.01, details=lambda: str(open_leases(served.state)))


def test_multi_image_request_split_over_a_failing_and_a_good_batch(own_backbone, tmp_path):
    # Batches of 2 rows: a 4-image request spans two forwards; only the first fails.
    config = make_config(tmp_path, max_batch_size=2, max_wait_ms=50.0, request_timeout=20.0)
    with serve_in_thread(config, own_backbone) as s:
        assert s.post("/v1/prompts?task=t", content=prompt_bytes(own_backbone.info)).status_code == 201
        fault = FailingForward(own_backbone.model)
        try:
            fault.fail_next = 1
            r = s.post("/v1/classify?task=t", **multipart(4))
            assert r.status_code == 500, r.text
            assert error_code(r) == "batch_failed"
            assert fault.rows_failed == 2  # only the first batch failed...
            # ...the other half still runs (the answer did not wait for it)
            wait_until(lambda: fault.calls >= 2, 10, "the second batch", interval=0.01)
            assert_no_leases(s)  # and its pins were released when it settled
            ok = s.post("/v1/classify?task=t", **multipart(4))
            assert ok.status_code == 200 and len(ok.json()["results"]) == 4
        finally:
            fault.handle.remove()


def test_repeated_batch_failures_fail_every_request_and_recover(own_backbone, tmp_path):
    config = make_config(tmp_path, max_batch_size=4, max_wait_ms=20.0, request_timeout=20.0)
    with serve_in_thread(config, own_backbone) as s:
        for task in ("a", "b"):
            assert s.post(f"/v1/prompts?task={task}", content=prompt_bytes(own_backbone.info)).status_code == 201
        fault = FailingForward(own_backbone.model)
        try:
            fault.armed.set()
            calls = [
                ("POST", f"/v1/classify?task={task}", {"content": image(i), "headers": {"content-type": "image/png"}})
                for i in range(6)
                for task in ("a", "b")
            ] + [("POST", "/v1/classify?task=a", multipart(3))]
            responses = s.gather(calls)
            assert all(not isinstance(r, BaseException) for r in responses), responses
            assert {r.status_code for r in responses} == {500}
            assert {error_code(r) for r in responses} == {"batch_failed"}
            assert fault.rows_failed == 15  # every row ran in some failed batch; none was dropped
            assert s.state.worker.alive and s.get("/healthz").status_code == 200
            failures = parse_metrics(s.get("/metrics").text)
            assert failures['lpt_batch_failures_total{stage="forward"}'] >= 4  # each failed batch logged and counted
            assert_no_leases(s)
            fault.armed.clear()
            responses = s.gather(calls)
            assert [r.status_code for r in responses] == [200] * len(calls)
            assert_no_leases(s)
        finally:
            fault.handle.remove()


class RaisesOnce:
    """Wraps a metric: its first ``observe`` raises (a bug in the loop's bookkeeping), later ones pass through."""

    def __init__(self, real) -> None:
        self.real = real
        self.raised = threading.Event()

    def observe(self, value: float) -> None:
        if not self.raised.is_set():
            self.raised.set()
            raise RuntimeError("injected failure in the batch loop, outside the forward")
        self.real.observe(value)


def test_a_failure_in_the_loop_outside_the_forward_fails_only_that_batch(backbone, tmp_path):
    config = make_config(tmp_path, max_batch_size=1, max_wait_ms=1.0, request_timeout=20.0)
    with serve_in_thread(config, backbone) as s:
        assert s.post("/v1/prompts?task=t", content=prompt_bytes(backbone.info)).status_code == 201
        worker = s.state.worker
        real = worker.metrics.batch_tasks
        worker.metrics.batch_tasks = RaisesOnce(real)  # runs after the forward, before any future is settled
        try:
            call = ("POST", "/v1/classify?task=t", {"content": image(1), "headers": {"content-type": "image/png"}})
            responses = s.gather([call, call, call])  # batches of one: three batches, the first one fails
            assert sorted(r.status_code for r in responses) == [200, 200, 500], [r.text for r in responses]
            failed = next(r for r in responses if r.status_code == 500)
            assert error_code(failed) == "batch_failed" and "Retry-After" not in failed.headers
            assert worker.alive and s.get("/healthz").status_code == 200
            r = s.post("/v1/classify?task=t", content=image(2), headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            metrics = parse_metrics(s.get("/metrics").text)
            assert metrics['lpt_batch_failures_total{stage="loop"}'] == 1
            assert metrics['lpt_batch_failures_total{stage="forward"}'] == 0
            assert_no_leases(s)
        finally:
            worker.metrics.batch_tasks = real


def test_a_device_that_fails_every_forward_leaves_readiness_then_liveness_and_comes_back(own_backbone, tmp_path):
    config = make_config(
        tmp_path, max_batch_size=1, max_wait_ms=1.0, unready_after_failures=2, unhealthy_after_failures=4
    )
    with serve_in_thread(config, own_backbone) as s:
        assert s.post("/v1/prompts?task=t", content=prompt_bytes(own_backbone.info)).status_code == 201
        fault = FailingForward(own_backbone.model)
        try:
            fault.armed.set()
            classify = ("POST", "/v1/classify?task=t", {"content": image(1), "headers": {"content-type": "image/png"}})
            assert s.gather([classify])[0].status_code == 500
            assert s.get("/readyz").status_code == 200 and s.get("/healthz").status_code == 200  # one is not a fault
            assert s.gather([classify])[0].status_code == 500
            ready = s.get("/readyz")
            assert ready.status_code == 503 and ready.json()["detail"]["failing_batches"] == 2
            assert s.get("/healthz").status_code == 200  # out of traffic, not yet restarted
            for _ in range(2):
                assert s.gather([classify])[0].status_code == 500
            assert s.get("/healthz").status_code == 503
            metrics = parse_metrics(s.get("/metrics").text)
            assert metrics["lpt_consecutive_batch_failures"] >= 4
            fault.armed.clear()  # the device recovers: the idle loop's probe forward finds out without traffic
            wait_until(lambda: s.get("/readyz").status_code == 200, 15, "the probe to clear the failures")
            assert s.get("/healthz").status_code == 200
            assert parse_metrics(s.get("/metrics").text)["lpt_consecutive_batch_failures"] == 0
        finally:
            fault.handle.remove()
