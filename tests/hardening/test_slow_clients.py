"""Slow and heavy clients against a real ``lpt-serve`` process: idle connections, headers and bodies sent a byte at
a time are cut at their deadlines, hundreds of them do not keep a normal client out, and uploads are bounded.

The deadlines are shortened here (2 s headers, 3 s body) so the suite stays fast; the defaults are checked to
be within the 30 s the service promises."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from bench.slow_clients import Trickle, open_for
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


def closed_after(server: LptServe, first: bytes = b"", trickle: bytes = b"") -> dict:
    """How the server ends a connection that sends ``first``, then ``trickle`` a byte every 0.5 s."""
    return open_for(server.host, server.port, first, trickle, every_s=0.5, limit_s=30.0)


def connect(server: LptServe) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.settimeout(30)
    return sock


def test_the_default_deadlines_are_within_thirty_seconds() -> None:
    assert ServiceConfig.header_timeout <= 30 and ServiceConfig.body_timeout <= 30


def test_an_idle_connection_is_closed_at_the_header_deadline(server) -> None:
    assert closed_after(server)["closed_after_s"] < HEADER_S + 2


def test_headers_sent_a_byte_at_a_time_are_cut_at_the_header_deadline(server) -> None:
    ended = closed_after(server, trickle=b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200)
    assert ended["closed_after_s"] < HEADER_S + 2


def test_a_body_sent_a_byte_at_a_time_answers_408_at_the_body_deadline(server) -> None:
    head = b"POST /v1/classify?task=t HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
    ended = closed_after(server, head, b"\x89PNG" * 100)
    assert ended["answer"].startswith("HTTP/1.1 408") and BODY_S - 0.5 < ended["closed_after_s"] < BODY_S + 3


def test_two_hundred_slow_connections_do_not_keep_a_normal_client_out(server, backbone) -> None:
    with Trickle(server.host, server.port, 200, every_s=0.5), httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("/v1/prompts?task=t", content=prompt_bytes(backbone.info)).status_code in (200, 201)
        for i in range(5):
            r = http.post("/v1/classify?task=t&top_k=1", content=image_bytes(i))
            assert r.status_code == 200, r.text


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
