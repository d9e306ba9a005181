"""Encoded image -> oriented RGB image at the smallest size the backbone's eval transform still resizes down from.

The one decoder that the service and the trainer share, so that training and serving see the same pixels:

1. open (optionally restricted to a format allow-list) and hand the still-undecoded image to a caller's
   header check (the service refuses bombs, odd dimensions and polyglots here, before any pixel is decoded);
2. JPEG: decode in the DCT domain at the smallest scale (1/2, 1/4, 1/8) whose shorter side is still at least
   the transform's resize size (``Image.draft``): a 12 MP photo costs a fraction of a full decode;
3. apply the EXIF orientation (phones store portrait shots sideways with Orientation = 6); a corrupt EXIF
   block means no orientation, never an error;
4. any mode (CMYK, palette, alpha, 16-bit) -> 8-bit RGB;
5. other formats (or a JPEG still far too large after the DCT scale): a cheap integer box ``reduce`` when the
   image is several times larger than the resize size needs, leaving the final antialiased resize to the
   backbone's own timm eval transform.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import timm
import torch
from PIL import Image, ImageOps, JpegImagePlugin

# ``reduce`` keeps at least this many times the needed side: the transform's antialiased resize then does the
# last step from a still generous image (Pillow's ``reducing_gap`` idea), so the pixels match a full decode.
REDUCE_GAP = 2

ImageInput = bytes | str | Path | IO[bytes]


class EvalTransform:
    """timm's eval transform for a data config (resize, centre crop, to tensor, normalise), with the shorter side
    a decoded image must keep for it (``resize_side``).

    Args:
        data_config: the backbone's timm data config (``input_size``, ``crop_pct``, ``crop_mode``, ...).
    """

    def __init__(self, data_config: dict[str, Any]):
        self.transform = timm.data.create_transform(**data_config, is_training=False)
        self.resize_side = resize_side(data_config)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def __repr__(self) -> str:
        return f"EvalTransform(resize_side={self.resize_side}, {self.transform!r})"


def resize_side(data_config: dict[str, Any]) -> int | None:
    """The shorter side a decoded image needs so that timm's eval transform only ever scales it down.

    timm resizes to ``floor(input / crop_pct)`` per axis and centre-crops ``input``. A shorter side of at least
    the larger of the two resize sizes covers every crop mode (``center`` and ``squash`` scale each axis to its
    size; ``border`` scales the longer side). ``None`` (decode at full size) when the transform trims a border
    in source pixels, whose meaning a reduced decode would change.

    Args:
        data_config: a timm data config.
    """
    if data_config.get("crop_border_pixels"):
        return None
    crop_pct = data_config.get("crop_pct") or timm.data.DEFAULT_CROP_PCT
    return max(math.floor(side / crop_pct) for side in data_config["input_size"][-2:])


def decode_side(transform: Any) -> int | None:
    """The shorter side ``transform`` needs from a decoded image when it says so (``EvalTransform``), else
    ``None``: decode at full size (a random-resized-crop training transform wants every source pixel)."""
    side = getattr(transform, "resize_side", None)
    return side if isinstance(side, int) and side > 0 else None


def load_image(
    source: ImageInput,
    min_side: int | None = None,
    formats: Sequence[str] | None = None,
    check: Callable[[Image.Image], None] | None = None,
) -> Image.Image:
    """Open, check, decode (reduced), orient and convert one image to 8-bit RGB.

    Args:
        source: encoded bytes, a path or a binary file object.
        min_side: the shorter side the result must keep (``resize_side``); ``None`` decodes at full size.
        formats: Pillow formats to accept (``None``: any Pillow can open).
        check: called with the opened, not yet decoded image (header fields only); raises to refuse it.

    Raises:
        whatever Pillow raises for unreadable data (``UnidentifiedImageError``, ``OSError``, ...) and ``check``'s
        errors; never for a corrupt EXIF block.
    """
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    with Image.open(fp, formats=formats) as image:
        if check is not None:
            check(image)
        image.seek(0)  # animated GIF/WebP: the first frame
        if min_side and isinstance(image, JpegImagePlugin.JpegImageFile):
            # Asking for (S, S) makes Pillow pick the scale from the shorter side: ceil(short / scale) >= S.
            image.draft(None, (min_side, min_side))
        image.load()
        oriented = apply_exif_orientation(image)
        return reduce_to(to_rgb(oriented), min_side)


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen (EXIF Orientation 2-8 undone); unchanged for 1, none or corrupt EXIF.

    Args:
        image: a loaded image.
    """
    try:
        orientation = image.getexif().get(0x0112, 1)  # ExifTags.Base.Orientation
    except Exception:  # Pillow raises many types on corrupt EXIF; all mean "no orientation"
        return image
    if orientation not in range(2, 9):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # rewriting a corrupt EXIF block after the transpose failed: keep pixels
        return image


def reduce_to(image: Image.Image, min_side: int | None) -> Image.Image:
    """Integer box reduction while the shorter side stays >= ``REDUCE_GAP * min_side``; else the image itself.

    Args:
        image: an RGB (or L) image.
        min_side: the shorter side the transform resizes to; ``None``: no reduction.
    """
    if not min_side:
        return image
    factor = min(image.size) // (REDUCE_GAP * min_side)
    return image.reduce(factor) if factor >= 2 else image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any accepted mode (CMYK, LA, P, RGBA, 16-bit, 1-bit) -> 8-bit RGB; an RGB image is returned as it is."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        peak = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / (65535.0 if peak > 255 else max(peak, 1.0) if image.mode == "F" else 255.0)
        image = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image if image.mode == "RGB" else image.convert("RGB")
