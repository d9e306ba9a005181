"""The socket lpt-serve listens on: the connections accepted on it have Nagle's algorithm off (TCP_NODELAY), so a
response written as headers, then body is not held back until the client's delayed ACK (40 ms on Linux, on
every request after the first of a kept-alive connection)."""

from __future__ import annotations

import asyncio
import socket

from service.cli import bind


async def _accepted_nodelay() -> int:
    """TCP_NODELAY of a connection accepted by an asyncio server (as uvicorn runs one) on ``bind``'s socket."""
    loop = asyncio.get_running_loop()
    seen: asyncio.Future[int] = loop.create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    listening = bind("127.0.0.1", 0)
    server = await loop.create_server(Probe, sock=listening)
    async with server:
        _, writer = await asyncio.open_connection(*listening.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 5)
        finally:
            writer.close()


def test_connections_accepted_on_the_listening_socket_have_nagle_off() -> None:
    assert asyncio.run(_accepted_nodelay()) != 0
