"""The load generator's open-loop HTTP client: keep-alive connections reused, a connection the server closed
replaced, the status of every answer (bench/raw_http.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from bench.raw_http import RawHttpClient


class _Answers(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: 200 for ``/ok``, 429 otherwise; ``/drop`` answers, then silently closes the
    connection (as a server whose keep-alive timeout passed)."""

    protocol_version = "HTTP/1.1"
    connections: ClassVar[set[tuple[str, int]]] = set()

    def do_POST(self) -> None:
        _Answers.connections.add(self.client_address)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200 if self.path.startswith(("/ok", "/drop")) else 429)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.path.startswith("/drop"):
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def url() -> Iterator[str]:
    _Answers.connections = set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _post_all(url: str, paths: list[str]) -> list[int]:
    async def go() -> list[int]:
        client = RawHttpClient(url)
        try:
            return [await client.post(p, b"jpeg-bytes", {"Content-Type": "image/jpeg"}) for p in paths]
        finally:
            await client.close()

    return asyncio.run(go())


def test_kept_alive_connections_are_reused(url: str) -> None:
    assert _post_all(url, ["/ok?task=a", "/no", "/ok", "/ok"]) == [200, 429, 200, 200]
    assert len(_Answers.connections) == 1


def test_a_connection_the_server_closed_is_replaced(url: str) -> None:
    assert _post_all(url, ["/drop", "/ok", "/ok"]) == [200, 200, 200]
    assert len(_Answers.connections) == 2


def test_only_a_plain_http_url_is_taken() -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        RawHttpClient("https://example.org")
