"""A minimal HTTP/1.1 client for the load generator's open-loop streams: POST with a body, keep-alive connections
kept in a free list. Standard library only.

Why not httpx there: under a flood, each 429 closes its connection (the server answers before reading the body),
so an open-loop stream opens a connection per rejected request, a couple of hundred per second. httpx's pool
does work quadratic in its connections on every request it adds or releases; the generator's one event loop then
used a whole core and fell seconds behind while the server kept answering (the overload benchmark's witness
shows it). Here a request costs a free-list pop, one write and a read of the answer.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class RawHttpClient:
    """POSTs to one server over HTTP/1.1, reusing each connection the server keeps open.

    Args:
        url: the server's base URL (``http://host:port``).
    """

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"a plain http://host:port URL is needed, not {url!r}")
        self.host, self.port = parts.hostname, parts.port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, target: str, body: bytes, headers: dict[str, str]) -> int:
        """Send ``POST target`` with ``body`` and ``headers``; the answer's status code (its body is read and
        dropped). A transport error raises ``OSError`` or ``asyncio.IncompleteReadError``."""
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = f"POST {target} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n{head}\r\n"
        payload = request.encode() + body
        if self._idle:
            try:
                return await self._exchange(self._idle.pop(), payload)
            except (OSError, asyncio.IncompleteReadError):
                pass  # the server closed the idle connection meanwhile (its keep-alive timeout): a new one
        return await self._exchange(await asyncio.open_connection(self.host, self.port), payload)

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], payload: bytes) -> int:
        reader, writer = conn
        try:
            writer.write(payload)
            status, length, keep = await _read_head(reader)
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if keep:
            self._idle.append(conn)
        else:
            writer.close()
        return status

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, int, bool]:
    """(status, Content-Length, whether the connection stays open) of the answer's head."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip().lower()
    if "content-length" not in fields:
        raise OSError("an answer without Content-Length (chunked answers are not read here)")
    connection = fields.get("connection")
    keep = connection == "keep-alive" if lines[0].startswith("HTTP/1.0") else connection != "close"
    return status, int(fields["content-length"]), keep
