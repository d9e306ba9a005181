"""Slow and heavy clients against a real ``lpt-serve`` process: idle connections, headers and bodies sent a byte at
a time are cut at their deadlines, hundreds of them do not keep a normal client out, and uploads are bounded.

The deadlines are shortened here (2 s headers, 3 s body) so the suite stays fast; the defaults are checked to
be within the 30 s the service promises."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from service.settings import ServiceConfig
from tests.support.images import image_bytes
from tests.support.lpt_serve import TEST_BACKBONE_ARGS, LptServe
from tests.support.prompt_sets import prompt_bytes

pytestmark = pytest.mark.slow

HEADER_S, BODY_S = 2.0, 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LptServe]:
    tmp = tmp_path_factory.mktemp("slow-clients")
    args = [
        *TEST_BACKBONE_ARGS,
        "--header-timeout", str(HEADER_S), "--body-timeout", str(BODY_S),
        "--max-concurrent-uploads", "1", "--max-connections", "400",
    ]  # fmt: skip
    with LptServe(tmp / "serve.log", args, data_dir=tmp / "data") as s:
        yield s


def connect(server: LptServe) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.settimeout(30)
    return sock


def closed_after(sock: socket.socket, trickle: bytes = b"", every_s: float = 0.5, limit_s: float = 30.0) -> float:
    """Seconds until the server closes ``sock`` while it sends ``trickle`` a byte per ``every_s`` (or nothing)."""
    started = time.monotonic()
    sock.settimeout(every_s)
    for i in range(10_000):
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"still open after {limit_s} s")
        try:
            if trickle:
                sock.send(trickle[i % len(trickle) : i % len(trickle) + 1])
            data = sock.recv(4096)
            if not data or data.startswith(b"HTTP/1.1 408"):
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    raise AssertionError("unreachable")


def test_the_default_deadlines_are_within_thirty_seconds() -> None:
    assert ServiceConfig.header_timeout <= 30 and ServiceConfig.body_timeout <= 30


def test_an_idle_connection_is_closed_at_the_header_deadline(server) -> None:
    with connect(server) as sock:
        assert closed_after(sock) < HEADER_S + 2


def test_headers_sent_a_byte_at_a_time_are_cut_at_the_header_deadline(server) -> None:
    with connect(server) as sock:
        assert closed_after(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200) < HEADER_S + 2


def test_a_body_sent_a_byte_at_a_time_answers_408_at_the_body_deadline(server) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /v1/classify?task=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n")
        sock.sendall(b"Content-Length: 5000\r\n\r\n")
        took = closed_after(sock, b"\x89PNG" * 100)
        assert BODY_S - 0.5 < took < BODY_S + 3


def test_two_hundred_slow_connections_do_not_keep_a_normal_client_out(server, backbone) -> None:
    socks = [connect(server) for _ in range(200)]
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for sock in socks:
                with contextlib.suppress(OSError):  # the server closed it: the point of the exercise
                    sock.send(b"G")
            stop.wait(0.5)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert http.post("/v1/prompts?task=t", content=prompt_bytes(backbone.info)).status_code in (200, 201)
            for i in range(5):
                r = http.post("/v1/classify?task=t&top_k=1", content=image_bytes(i))
                assert r.status_code == 200, r.text
    finally:
        stop.set()
        feeder.join(5)
        for sock in socks:
            sock.close()


def test_uploads_beyond_the_concurrent_limit_answer_429_before_their_body_is_read(server) -> None:
    with connect(server) as slow, httpx.Client(base_url=server.url, timeout=10) as http:
        slow.sendall(b"POST /v1/prompts?task=u HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nxx")
        time.sleep(0.5)  # its upload slot is taken while its body trickles
        r = http.post("/v1/prompts?task=v", content=b"x" * 10)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
    wait = time.monotonic() + BODY_S + 5
    while time.monotonic() < wait:  # the slow upload timed out and gave its slot back
        with httpx.Client(base_url=server.url, timeout=10) as http:
            if http.post("/v1/prompts?task=v", content=b"x" * 10).status_code == 422:
                return
        time.sleep(0.2)
    raise AssertionError("the upload slot was never given back")
