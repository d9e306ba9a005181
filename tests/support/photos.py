"""Test pictures stored as cameras store them: an upright photo, and its bytes under any EXIF orientation."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

ORIENTATION = 0x0112  # the EXIF tag
# Orientation tag -> how a camera stores the upright picture under that tag (the inverse of what a viewer applies).
STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def photo(size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """An upright test picture that no flip or rotation maps onto itself: gradients, a bright corner block, noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([255 * xx / w, 255 * yy / h, 128 + 60 * np.sin(xx / 9.0) * np.cos(yy / 13.0)], axis=-1)
    rgb[: h // 3, : w // 4] = (250, 250, 40)
    rgb += np.random.default_rng(seed).normal(0, 2, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", orientation: int | None = None, **save) -> bytes:
    """``image`` stored as a camera would under ``orientation`` (pixels transposed, tag set)."""
    if orientation is not None and STORED_AS[orientation] is not None:
        image = image.transpose(STORED_AS[orientation])
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        save["exif"] = exif.tobytes()
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}) | save)
    return buf.getvalue()


def sideways(image: Image.Image) -> bytes:
    """The pixels a phone stores for an upright portrait shot (Orientation = 6), without the tag that says so."""
    return encode(image.transpose(STORED_AS[6]))
