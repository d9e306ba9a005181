"""Hostile HTTP and faults against a real ``lpt-serve`` process on loopback (uvicorn, real sockets).

- A declared multi-gigabyte body is answered 413 before it is sent (the client has sent 64 KB of it).
- SIGTERM during keyed traffic: requests in flight complete with 200; a keep-alive connection opened before the
  signal and new connections are refused; the process exits within its grace period; no API key appears in its
  output. (tests/e2e/test_serve_subprocess.py covers the keyless in-flight/exit case.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.redis_server import free_port
from tests.service_harness import KEYS, auth

pytestmark = pytest.mark.timeout(180)

GRACE_S = 5.0
QUICK_S = 2.0


class Process:
    def __init__(self, tmp: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        exe = shutil.which("lpt-serve")
        cmd = [exe] if exe else [sys.executable, "-m", "service.cli"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--backbone", "test_vit"]
        cmd += ["--backbone-weights", "random:0", "--img-size", "32", "--data-dir", str(tmp / "data"), "--demo"]
        cmd += ["--shutdown-timeout", str(GRACE_S), "--log-level", "debug", *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LPT_")}
        env["LPT_API_KEYS"] = ",".join(f"{t}:{k}" for t, k in KEYS.items())
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"lpt-serve never became ready:\n{self.output()}"
            time.sleep(0.1)
        self.demo_jpg = (tmp / "data" / "demo.jpg").read_bytes()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def process(tmp_path):
    p = Process(tmp_path, "--max-wait-ms", "400")
    try:
        yield p
    finally:
        p.stop()


def status_line_for_declared_body(port: int, path: str, declared: int) -> tuple[str, float]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS['alpha']}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=QUICK_S * 2) as sock:
        started = time.perf_counter()
        sock.sendall(head.encode() + b"\x00" * 65536)
        reply = sock.recv(4096).decode(errors="replace")
        return reply.split("\r\n", 1)[0], time.perf_counter() - started


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def wait_until_draining(url: str) -> None:
    """Until the signal has been handled: /readyz says draining, or the listening socket is closed."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=1.0)
        except httpx.TransportError:
            return
        if r.status_code == 503 and r.json()["detail"]["draining"]:
            return
        time.sleep(0.005)
    pytest.fail("the service never started draining after SIGTERM")


def test_declared_huge_body_is_refused_before_it_is_sent(process):
    for path in ("/v1/classify?task=demo", "/v1/prompts?task=big"):
        status, elapsed = status_line_for_declared_body(process.port, path, 10 * 1024**3)
        assert status.startswith("HTTP/1.1 413"), status
        assert elapsed < QUICK_S
    r = httpx.post(f"{process.url}/v1/classify?task=demo", content=process.demo_jpg, headers=auth("alpha"), timeout=10)
    assert r.status_code == 200


def test_sigterm_during_keyed_traffic(process):
    url = process.url
    hits0 = metric(url, "lpt_prompt_cache_hits_total")

    def one(i: int) -> int:
        tenant = ("alpha", "beta")[i % 2]
        with httpx.Client(timeout=30) as c:
            return c.post(f"{url}/v1/classify?task=demo", content=process.demo_jpg, headers=auth(tenant)).status_code

    keep_alive = httpx.Client(timeout=5)
    assert keep_alive.get(f"{url}/healthz").status_code == 200  # a pooled connection, open before the signal
    n = 6
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        deadline = time.monotonic() + 30
        while metric(url, "lpt_prompt_cache_hits_total") < hits0 + n:  # all in the handler, waiting for a batch
            assert time.monotonic() < deadline, process.output()
            time.sleep(0.01)
        signalled = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        wait_until_draining(url)
        # New work is refused: on the old keep-alive connection, and on a new one.
        for attempt in (keep_alive, httpx.Client(timeout=5)):
            try:
                r = attempt.post(f"{url}/v1/classify?task=demo", content=process.demo_jpg, headers=auth("alpha"))
                assert r.status_code == 503, r.text
            except httpx.TransportError:
                pass
            finally:
                attempt.close()
        statuses = [f.result(timeout=60) for f in futures]
    try:
        process.proc.wait(GRACE_S + 5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"lpt-serve did not exit within its grace period:\n{process.output()}")
    assert statuses == [200] * n, process.output()  # everything in flight completed
    assert time.monotonic() - signalled < GRACE_S + 5
    assert process.proc.returncode in (0, -signal.SIGTERM), process.output()
    output = process.output()
    assert "Application shutdown complete" in output
    for secret in KEYS.values():
        assert secret not in output
