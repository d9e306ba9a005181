"""Request images for the service tests: random-pixel PNGs, and one-colour PNGs and JPEGs in any mode."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def image_bytes(seed: int, size: tuple[int, int] = (40, 36)) -> bytes:
    """A PNG of random pixels (distinct images give distinct scores)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, "PNG")
    return buf.getvalue()


def png_bytes(size: tuple[int, int] = (48, 40), mode: str = "RGB", color: Any = None, **save: Any) -> bytes:
    """A PNG of one colour in any mode."""
    img = Image.new(mode, size, color if color is not None else _default_color(mode))
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (48, 40), mode: str = "RGB") -> bytes:
    """A JPEG of one colour in any mode JPEG stores (RGB, L, CMYK)."""
    img = Image.new(mode, size, _default_color(mode))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _default_color(mode: str) -> Any:
    return {"RGB": (120, 30, 200), "RGBA": (120, 30, 200, 128), "L": 90, "LA": (90, 128), "CMYK": (10, 20, 30, 0)}.get(
        mode, 1
    )
