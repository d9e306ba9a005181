"""Hostile HTTP and faults against a real ``lpt-serve`` process on loopback (uvicorn, real sockets).

- A declared multi-gigabyte body is answered 413 before it is sent (the client has sent 64 KB of it).
- SIGTERM during keyed traffic: requests in flight complete with 200; a keep-alive connection opened before the
  signal and new connections are refused; the process exits within its grace period; no API key appears in its
  output. (tests/e2e/test_serve_subprocess.py covers the keyless in-flight/exit case.)
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.lpt_serve import TEST_BACKBONE_ARGS, LptServe
from tests.support.metrics import metric_value
from tests.support.service_app import KEYS, auth
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)

GRACE_S = 5.0
QUICK_S = 2.0


@pytest.fixture
def process(tmp_path) -> Iterator[LptServe]:
    args = [*TEST_BACKBONE_ARGS, "--demo", "--shutdown-timeout", str(GRACE_S), "--log-level", "debug"]
    args += ["--max-wait-ms", "400"]
    env = {"LPT_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items())}
    with LptServe(tmp_path / "serve.log", args, env, data_dir=tmp_path) as server:
        yield server


def demo_jpg(process: LptServe) -> bytes:
    return (process.data_dir / "demo.jpg").read_bytes()


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


def cache_hits(url: str) -> float:
    return metric_value(httpx.get(f"{url}/metrics", timeout=5).text, "lpt_prompt_cache_hits_total")


def wait_until_draining(url: str) -> None:
    """Until the signal has been handled: /readyz says draining, or the listening socket is closed."""

    def draining() -> bool:
        try:
            r = httpx.get(f"{url}/readyz", timeout=1.0)
        except httpx.TransportError:
            return True
        return r.status_code == 503 and r.json()["detail"]["draining"]

    wait_until(draining, 10, "the service to start draining after SIGTERM", interval=0.005)


def test_declared_huge_body_is_refused_before_it_is_sent(process):
    for path in ("/v1/classify?task=demo", "/v1/prompts?task=big"):
        status, elapsed = status_line_for_declared_body(process.port, path, 10 * 1024**3)
        assert status.startswith("HTTP/1.1 413"), status
        assert elapsed < QUICK_S
    r = httpx.post(f"{process.url}/v1/classify?task=demo", content=demo_jpg(process), headers=auth("alpha"), timeout=10)
    assert r.status_code == 200


def test_sigterm_during_keyed_traffic(process):
    url = process.url
    hits0 = cache_hits(url)
    image = demo_jpg(process)

    def one(i: int) -> int:
        tenant = ("alpha", "beta")[i % 2]
        with httpx.Client(timeout=30) as c:
            return c.post(f"{url}/v1/classify?task=demo", content=image, headers=auth(tenant)).status_code

    keep_alive = httpx.Client(timeout=5)
    assert keep_alive.get(f"{url}/healthz").status_code == 200  # a pooled connection, open before the signal
    n = 6
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        # All in the handler, waiting for a batch.
        wait_until(lambda: cache_hits(url) >= hits0 + n, 30, "the requests", interval=0.01, details=process.output)
        signalled = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        wait_until_draining(url)
        # New work is refused: on the old keep-alive connection, and on a new one.
        for attempt in (keep_alive, httpx.Client(timeout=5)):
            try:
                r = attempt.post(f"{url}/v1/classify?task=demo", content=image, headers=auth("alpha"))
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
