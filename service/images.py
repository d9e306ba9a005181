"""Untrusted bytes -> checked, decoded, preprocessed image tensor. Runs in a worker thread.

Checks happen in order of cost: size, format signature (Pillow restricted to an allow-list), declared
dimensions from the header (before any pixel is decoded: image bombs stop here), then the shared decoder
``lpt.images.load_image`` (reduced JPEG decode, EXIF orientation, RGB; the trainer reads its data through it
too) and the backbone's own timm eval transform.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from lpt.errors import LptError
from lpt.images import decode_side, load_image, to_rgb
from service.errors import BadImage, ImageRejected, ImageTooLarge, UnsupportedMediaType

__all__ = [
    "ALLOWED_CONTENT_TYPES",
    "ALLOWED_FORMATS",
    "MAX_ASPECT",
    "DecodePool",
    "ImageDecoder",
    "check_content_type",
    "guard_pillow_pixels",
    "to_rgb",
]
log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
ALLOWED_CONTENT_TYPES = {
    "image/jpeg",
    "image/jpg",
    "image/png",
    "image/webp",
    "image/bmp",
    "image/gif",
    "image/x-ms-bmp",
    "application/octet-stream",
    # curl --data-binary sends this unless told otherwise; the bytes are sniffed against the allow-list anyway.
    "application/x-www-form-urlencoded",
}
MAX_ASPECT = 32
_ZIP_MARKERS = (b"PK\x03\x04", b"PK\x05\x06")


def guard_pillow_pixels(max_pixels: int) -> None:
    """Pillow's own image-bomb guard as a second line behind ``ImageDecoder``'s header check: past ``max_pixels``
    it raises instead of warning. Process-wide (Pillow keeps one limit, and ``warnings.catch_warnings`` per decode
    would swap the global filter list unsafely across threads), so the process edge calls it once."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def check_content_type(content_type: str | None) -> None:
    """Accept raw image types, octet-stream, or none; anything else is a client mistake (415)."""
    if not content_type:
        return
    base = content_type.split(";")[0].strip().lower()
    if base not in ALLOWED_CONTENT_TYPES:
        raise UnsupportedMediaType(f"Content-Type {base!r} is not an accepted image type")


class ImageDecoder:
    """Decode and preprocess one image.

    Args:
        transform: the backbone's eval transform (PIL RGB -> normalised ``[3, H, W]`` tensor); when it names the
            shorter side it resizes to (``lpt.images.EvalTransform``), images are decoded only that large.
        max_bytes: largest accepted encoded image.
        max_pixels: largest accepted width * height, checked from the header before decoding.
    """

    def __init__(self, transform: Any, max_bytes: int, max_pixels: int):
        self.transform = transform
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.min_side = decode_side(transform)

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.transform(self.decode(data))

    def decode_all(self, blobs: Sequence[bytes]) -> list[torch.Tensor]:
        """Every image of a request, in order; with several, an error names its part (field ``image[i]``, from 0).

        Args:
            blobs: the encoded images (one raw body, or the multipart ``image`` parts).
        """
        out = []
        for i, data in enumerate(blobs):
            try:
                out.append(self(data))
            except LptError as exc:
                if len(blobs) > 1:  # a client sending several files needs to know which one was refused
                    exc.field = f"image[{i}]"
                    exc.message = f"image {i + 1} of {len(blobs)}: {exc.message}"
                raise
        return out

    def decode(self, data: bytes) -> Image.Image:
        if not data:
            raise BadImage("the request body is empty", code="empty_image")
        if len(data) > self.max_bytes:
            raise ImageTooLarge(f"image is {len(data)} bytes, limit {self.max_bytes}")
        try:
            return load_image(data, self.min_side, ALLOWED_FORMATS, check=partial(self._check_header, data=data))
        except (ImageRejected, ImageTooLarge):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"image exceeds {self.max_pixels} pixels") from exc
        except UnidentifiedImageError as exc:
            accepted = ", ".join(ALLOWED_FORMATS)
            message = f"not an image in an accepted format ({accepted})"
            raise UnsupportedMediaType(message, code="unsupported_image") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
            raise BadImage(f"cannot decode image: {exc}", code="corrupt_image") from exc

    def _check_header(self, image: Image.Image, data: bytes) -> None:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected(f"image is {width}x{height}")
        if width * height > self.max_pixels:
            raise ImageTooLarge(f"image is {width}x{height}, limit {self.max_pixels} pixels")
        if max(width, height) > MAX_ASPECT * min(width, height):
            # A 100000x1 image is small in pixels but the resize to the model's input would not be.
            raise ImageRejected(f"aspect ratio of {width}x{height} exceeds {MAX_ASPECT}:1")
        if isinstance(image, JpegImagePlugin.JpegImageFile) and _has_trailing_archive(data):  # JPEG and MPO
            raise ImageRejected("the JPEG carries an archive after its end marker", code="polyglot_image")


class DecodePool:
    """A bounded set of threads that decode request images, below the batch loop's CPU priority.

    Why: decoding a camera photo costs about as much CPU as the backbone's forward for it. Decoded in the web
    server's shared thread pool (tens of threads), concurrent decodes outnumber the cores and preempt the
    forward's compute threads mid-kernel, so every core waits at the kernel's barriers for the descheduled one.
    A pool of one thread per core at a lower priority (Linux ``nice``, per thread) decodes in the time the
    forward leaves free and yields the cores as soon as the next batch is ready.

    Args:
        decoder: what each image goes through.
        threads: decoding threads (at least 1).
        niceness: how much lower the threads' priority is than the rest of the process (0: the same; Linux only).
    """

    def __init__(self, decoder: ImageDecoder, threads: int, niceness: int = 0):
        self.decoder = decoder
        self.niceness = niceness
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, threads), thread_name_prefix="lpt-decode", initializer=self._lower_priority
        )

    def _lower_priority(self) -> None:
        if self.niceness <= 0 or sys.platform != "linux":
            return
        try:  # on Linux the niceness of a thread id is that thread's own; raising it needs no privilege
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.niceness)
        except OSError as exc:
            log.warning("decode threads keep the process priority: %s", exc)

    async def decode_all(self, blobs: Sequence[bytes]) -> list[torch.Tensor]:
        """``ImageDecoder.decode_all`` on one of the pool's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.decoder.decode_all, blobs)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _has_trailing_archive(data: bytes) -> bool:
    end = data.rfind(b"\xff\xd9")
    tail = data[end + 2 :] if end >= 0 else b""
    return any(marker in tail for marker in _ZIP_MARKERS)
