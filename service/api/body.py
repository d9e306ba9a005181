"""Request bodies, capped before they are read whole: raw bytes or multipart parts."""

from __future__ import annotations

import asyncio

from fastapi import Request

from lpt.errors import TooLarge
from service.errors import BadRequest, RequestTimeout

MAX_PARTS = 64


async def read_capped(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as the declared or streamed size passes ``limit``, and (408) when it
    has not all arrived within the service's ``body_timeout`` (a client trickling its body holds memory and a
    connection; every front end reads its bodies here, so the rule is the same for all)."""
    timeout_s = request.app.state.lpt.config.body_timeout
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise BadRequest("Content-Length is not an integer", "content-length") from exc
        if size > limit:
            raise TooLarge(message=f"body of {size} bytes exceeds the limit of {limit}", field="body")
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout_s):
            total = 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise TooLarge(message=f"body exceeds the limit of {limit} bytes", field="body")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s") from None
    body = b"".join(chunks)
    # Starlette serves a cached body to request.form(); set it so multipart parsing reads these bytes.
    request._body = body
    return body


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def multipart_files(request: Request, name: str, limit: int) -> list[bytes]:
    """The bytes of every file part called ``name``, in order (call after ``read_capped``)."""
    try:
        form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS, max_part_size=limit)
    except Exception as exc:  # MultiPartException / HTTPException(400) from Starlette's parser
        detail = getattr(exc, "detail", exc)
        raise BadRequest(f"malformed multipart body: {detail}", "body", code="bad_multipart") from exc
    try:
        parts = []
        for value in form.getlist(name):
            if isinstance(value, str):
                parts.append(value.encode())
            else:
                parts.append(await value.read())
    finally:
        await form.close()
    if not parts:
        raise BadRequest(f"multipart body has no {name!r} part", name, code="bad_multipart")
    return parts
