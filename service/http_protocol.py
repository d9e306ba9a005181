"""uvicorn's HTTP/1.1 protocol with a deadline on a request's headers.

uvicorn closes an idle kept-alive connection after a response, but a connection that never completes its
request headers (a client that connects and waits, or sends a byte every few seconds) is kept forever: enough
of them exhaust the connection limit. Here every connection must finish a request's headers within
``header_timeout_s`` of being opened or of its previous response; otherwise it is closed. The body has its own
deadline in the routes (``service/api/body.py``), where the size limits are applied too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class HeaderDeadlineProtocol(H11Protocol):
    """``H11Protocol`` that closes a connection whose request headers do not arrive within ``header_timeout_s``.

    Args:
        header_timeout_s: seconds from connect (or from the previous response) to a complete request head.
        **kwargs: uvicorn's own protocol arguments.
    """

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_after: object = None  # the request cycle that was current when the timer was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._waiting_after:
            self._cancel_header_timer()  # a new request's head was parsed: its body has its own deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._waiting_after = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("closing a connection whose request headers took over %.1f s", self.header_timeout_s)
            self.transport.close()


def http_protocol(header_timeout_s: float) -> Any:
    """The protocol class argument for ``uvicorn.Config(http=...)``."""
    return functools.partial(HeaderDeadlineProtocol, header_timeout_s=header_timeout_s)
