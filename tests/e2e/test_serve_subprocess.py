"""A real ``lpt-serve`` process on a free port, driven over TCP by httpx, the ``lpt`` CLI and ``LptClient``:
readiness, the demo task, push/tasks/show/classify/rollback/delete, graceful SIGTERM under traffic, and the
refusal to listen beyond loopback without API keys."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from lpt.backbone import load_backbone
from lpt.client import ApiError, LptClient
from lpt.prompt_set import encode
from tests.support.lpt_serve import SHUTDOWN_GRACE_S, TEST_BACKBONE_ARGS, LptServe, run_lpt_serve
from tests.support.metrics import metric_value
from tests.support.ports import free_port
from tests.support.processes import clean_env, console_command
from tests.support.prompt_sets import make_set
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)

DEMO_CLASSES = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}


def demo_server(tmp: Path, *extra: str) -> LptServe:
    """An ``lpt-serve`` with the demo task, its data and log under ``tmp`` (started by ``with``)."""
    args = [*TEST_BACKBONE_ARGS, "--demo", "--shutdown-timeout", str(SHUTDOWN_GRACE_S), "--log-level", "info", *extra]
    return LptServe(tmp / "lpt-serve.log", args, data_dir=tmp)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LptServe]:
    # A batch window long enough that requests are still in flight when SIGTERM arrives (the last test).
    with demo_server(tmp_path_factory.mktemp("serve"), "--max-wait-ms", "400", "--max-batch-size", "64") as srv:
        yield srv


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> list[Path]:
    """Two versions of a 3-class set for the server's backbone (test_vit, random:0, 32 px)."""
    info = load_backbone("test_vit", "random:0", img_size=32).info
    out = tmp_path_factory.mktemp("sets")
    paths = []
    for seed in (1, 2):
        ps = make_set(info, ["cat", "dog", "fox"], pool=2, seed=seed, scale=1.0)
        path = out / f"v{seed}.safetensors"
        path.write_bytes(encode(ps))
        paths.append(path)
    return paths


def lpt(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*console_command("lpt", "lpt.cli"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env({"LPT_URL": url}),
    )


def test_ready_and_demo_task_classifies(server):
    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        demo = (server.data_dir / "demo.jpg").read_bytes()
        r = http.post("/v1/classify", params={"task": "demo"}, content=demo, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "demo" and body["version"] == 1 and len(body["predictions"]) == 5
        assert {p["label"] for p in body["predictions"]} <= DEMO_CLASSES
        assert r.headers["X-LPT-Replica"] == server.url.removeprefix("http://")
        assert http.get("/openapi.json").status_code == 200
        assert "lpt_requests_total" in http.get("/metrics").text
        assert http.get("/v1/backbone").json()["name"] == "test_vit"


def test_cli_push_tasks_show_classify_rollback(server, prompt_files):
    v1, v2 = prompt_files
    r = lpt(server.url, "push", str(v1), "--task", "pets")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 1
    r = lpt(server.url, "push", str(v2), "--task", "pets")
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == 2, r.stderr

    r = lpt(server.url, "tasks")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "pets\tv2\t3 classes" in lines and any(line.startswith("demo\tv1\t") for line in lines)

    r = lpt(server.url, "show", "pets")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["active_version"] == 2 and shown["class_names"] == ["cat", "dog", "fox"]

    img = server.data_dir / "demo.jpg"
    r = lpt(server.url, "classify", str(img), str(img), "--task", "pets", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert len(rows) == 2 and all(row.startswith(f"{img}\tv2\t") for row in rows), rows

    r = lpt(server.url, "rollback", "pets", "--version", "1")
    assert r.returncode == 0 and json.loads(r.stdout)["version"] == 1, r.stderr
    r = lpt(server.url, "classify", str(img), "--task", "pets")
    assert r.returncode == 0 and r.stdout.startswith(f"{img}\tv1\t"), r.stdout + r.stderr

    r = lpt(server.url, "classify", str(img), "--task", "no-such-task")
    assert r.returncode == 1 and "404" in r.stderr and "not_found" in r.stderr


def test_python_client(server, prompt_files):
    img = (server.data_dir / "demo.jpg").read_bytes()
    with LptClient(server.url, timeout=30.0) as client:
        assert client.backbone()["depth"] == 6
        pushed = client.push_prompt_set("client-task", prompt_files[0].read_bytes())
        assert pushed["version"] == 1 and pushed["num_classes"] == 3
        results = client.classify("client-task", [img, img, img], top_k=3)
        assert len(results) == 3 and all(r["version"] == 1 and len(r["predictions"]) == 3 for r in results)
        # The same image in three rows of one batch: the same classes, scores equal up to the last float bits
        # (the CPU kernels may block rows of a batch differently).
        first, second = results[0]["predictions"], results[1]["predictions"]
        assert [p["index"] for p in first] == [p["index"] for p in second]
        assert [p["score"] for p in first] == pytest.approx([p["score"] for p in second], abs=1e-6)
        assert "client-task" in {t["task"] for t in client.tasks()}
        assert client.delete("client-task") == {"task": "client-task", "deleted": True}
        with pytest.raises(ApiError) as err:
            client.show("client-task")
        assert err.value.status == 404 and err.value.code == "not_found"


def test_cli_classify_names_the_file_that_was_refused(server, tmp_path):
    img, bad = server.data_dir / "demo.jpg", tmp_path / "notes.txt"
    bad.write_text("not an image")
    r = lpt(server.url, "classify", str(img), str(bad), str(img), "--task", "demo")
    assert r.returncode == 1 and f"error 415 unsupported_image: {bad}: image 2 of 3: " in r.stderr, r.stderr
    r = lpt(server.url, "classify", str(bad), "--task", "demo")
    assert r.returncode == 1 and f"error 415 unsupported_image: {bad}: not an image" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_sigterm_during_traffic_finishes_in_flight_requests_and_exits(server):
    """Last in this module: it stops the shared server."""
    img = (server.data_dir / "demo.jpg").read_bytes()
    with httpx.Client(base_url=server.url, timeout=5.0) as http:
        hits0 = cache_hits(http)

    def one(_: int) -> tuple[int, float]:
        with httpx.Client(base_url=server.url, timeout=30.0) as http:
            r = http.post("/v1/classify", params={"task": "demo"}, content=img)
            return r.status_code, time.monotonic()

    n = 8
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        # Every request has reached the handler (each took a cache hit) and waits in the 400 ms batch window.
        with httpx.Client(base_url=server.url, timeout=5.0) as http:
            wait_until(lambda: cache_hits(http) >= hits0 + n, 30, "the requests to reach the server", interval=0.01)
        sent_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=60) for f in futures]
    try:
        server.proc.wait(SHUTDOWN_GRACE_S + 5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"lpt-serve did not exit within its grace period:\n{server.tail()}")
    exited_at = time.monotonic()
    assert [status for status, _ in results] == [200] * n, server.tail()
    assert any(done > sent_at for _, done in results), "no request was still in flight at SIGTERM"
    # uvicorn re-raises the captured SIGTERM once shutdown is complete: "terminated by SIGTERM" is a clean exit.
    assert server.proc.returncode in (0, -signal.SIGTERM), server.tail()
    assert "Application shutdown complete" in server.output()
    assert exited_at - sent_at < SHUTDOWN_GRACE_S + 5
    with pytest.raises(httpx.TransportError), httpx.Client(timeout=2.0) as http:
        http.get(f"{server.url}/healthz")


def cache_hits(http: httpx.Client) -> float:
    return metric_value(http.get("/metrics").text, "lpt_prompt_cache_hits_total")


def test_non_loopback_without_keys_refuses_to_start(tmp_path):
    args = ["--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(tmp_path), *TEST_BACKBONE_ARGS]
    r = run_lpt_serve(*args, timeout=60)
    assert r.returncode != 0
    assert "refusing to listen on 0.0.0.0 without API keys" in r.stderr, r.stderr
    assert not (tmp_path / "store").exists()  # it stopped before opening anything


def test_cli_reports_an_unreachable_service_and_a_missing_file_without_a_traceback(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = lpt(down, "tasks")
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = lpt(down, "push", str(tmp_path / "missing.safetensors"), "--task", "x")
    assert r.returncode == 1 and "missing.safetensors" in r.stderr and "Traceback" not in r.stderr, r.stderr
