"""Untrusted bytes -> checked, decoded, preprocessed image tensor. Runs in a worker thread.

Checks happen in order of cost: size, format signature (Pillow restricted to an allow-list), declared
dimensions from the header (before any pixel is decoded: image bombs stop here), then the shared decoder
``lpt.images.load_image`` (reduced JPEG decode, EXIF orientation, RGB; the trainer reads its data through it
too) and the backbone's own timm eval transform.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
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

    def pixels(self, data: bytes) -> int:
        """Width * height as the image's header declares it, without decoding a pixel (1 when the header cannot be
        read: decoding will say what is wrong). What a decode will cost, for scheduling."""
        try:
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
                width, height = image.size
        except Exception:
            return 1
        return max(1, width * height)

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


def _has_trailing_archive(data: bytes) -> bool:
    end = data.rfind(b"\xff\xd9")
    tail = data[end + 2 :] if end >= 0 else b""
    return any(marker in tail for marker in _ZIP_MARKERS)
