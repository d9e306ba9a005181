"""What the photo benchmarks share: their config, the photos themselves and the two decoders.

``bench.photos`` (throughput over HTTP) and ``bench.photos_agreement`` (top-1 agreement of the reduced and the
full-resolution decode) both import this module; neither imports the other's internals from here.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.options import BackboneOptions, ComputeOptions, option
from bench.real_data import CIFAR_ZIP
from lpt.backbone import Backbone
from service.images import ImageDecoder

MAX_BYTES, MAX_PIXELS = 10 * 1024 * 1024, 40_000_000  # the service's defaults
NOISE_SIGMA = 10.0  # grey levels: a 12 MP JPEG at quality 90 is then ~3.7 MB, as a camera's


@dataclass(frozen=True)
class Kind:
    """One kind of image: a name, the photo size (None: the CIFAR JPEG as it is) and the format."""

    name: str
    size: tuple[int, int] | None
    fmt: str = "JPEG"


KINDS = [
    Kind("small", None),
    Kind("0.3MP", (640, 480)),
    Kind("2MP", (1632, 1224)),
    Kind("12MP", (4000, 3000)),
    Kind("3MP-png", (2048, 1536), "PNG"),
]
AGREEMENT_SIZES = [(640, 480), (1632, 1224), (4000, 3000)]


@dataclass
class PhotosConfig(ComputeOptions, BackboneOptions):
    """Defaults: DeiT-Tiny 224 px on the CPU, the service's batching defaults, 16 closed-loop clients."""

    cifar_zip: Path = option(CIFAR_ZIP, help="CIFAR-10 JPEG zip the photos start from")  # noqa: RUF009 (a Path)
    per_kind: int = option(8, help="distinct images of each kind")
    concurrency: int = option(16, help="closed-loop clients")
    duration_s: float = option(20.0, flag="--duration", help="measured seconds per run")
    warmup_s: float = option(3.0, flag="--warmup", help="unmeasured lead-in seconds per run")
    repeats: int = option(3, help="rounds over all kinds (start rotating)")
    decode_repeats: int = option(3, help="timed decodes of every image for the decode CPU time")
    server_threads: int | None = option(None, help="OMP_NUM_THREADS of the server")
    agreement: bool = option(False, help="top-1 agreement of reduced and full decodes instead")
    count: int = option(300, help="images of the agreement run")
    per_class: int = option(50, help="CIFAR-10 training images per class mean")
    noise: float = option(NOISE_SIGMA, help="grey levels of Gaussian noise on the photos (0: upscaled only)")
    side_factors: tuple[int, ...] = option(
        (1,),
        help="agreement: also compare reduced decodes that keep these multiples of the resize side (1: the service's)",
    )
    seed: int = option(0)
    kinds: tuple[str, ...] = option(tuple(k.name for k in KINDS), help="kinds to run (small always runs)")
    baseline_repo: Path | None = option(None, help="checkout of a baseline server to interleave")  # noqa: RUF009

    def __post_init__(self) -> None:
        self.side_factors = tuple(sorted(set(self.side_factors)))
        unknown = set(self.kinds) - {k.name for k in KINDS}
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {', '.join(k.name for k in KINDS)}")


# ------------------------------------------------------------------------------------------------ the photos
def cifar_test_names(zf: zipfile.ZipFile, count: int) -> list[str]:
    """The ``count`` CIFAR-10 test JPEGs the photos start from (``test/CLASS/FILE.jpg``), spread over the classes."""
    names = sorted(n for n in zf.namelist() if n.startswith("test/") and n.endswith(".jpg"))
    return names[:: max(1, len(names) // count)][:count]


def base_labels(count: int, cifar_zip: Path) -> list[str] | None:
    """The class names of ``base_images(count, cifar_zip)`` (``None`` without the zip)."""
    if not Path(cifar_zip).is_file():
        return None
    with zipfile.ZipFile(cifar_zip) as zf:
        return [n.split("/")[1] for n in cifar_test_names(zf, count)]


def base_images(count: int, cifar_zip: Path, seed: int = 0) -> list[tuple[bytes, Image.Image]]:
    """``count`` CIFAR-10 test JPEGs spread over the classes (bytes and RGB image); seeded noise without the zip."""
    if Path(cifar_zip).is_file():
        with zipfile.ZipFile(cifar_zip) as zf:
            datas = [zf.read(n) for n in cifar_test_names(zf, count)]
        return [(d, Image.open(io.BytesIO(d)).convert("RGB")) for d in datas]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        out.append((encode(img, "JPEG"), img))
    return out


def upscale(image: Image.Image, size: tuple[int, int], seed: int, sigma: float = NOISE_SIGMA) -> Image.Image:
    """``image`` resized (bicubic) to ``size`` plus seeded Gaussian noise of ``sigma`` grey levels: a deterministic
    photo with entropy (``sigma`` 0: the upscaled image alone)."""
    big = image.resize(size, Image.Resampling.BICUBIC)
    if not sigma:
        return big
    pixels = np.asarray(big, dtype=np.float32)
    noise = np.random.default_rng(seed).standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels + sigma * noise, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """``image`` as a file: JPEG at ``quality``, or PNG (fast compression)."""
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


def make_kind(kind: Kind, bases: list[tuple[bytes, Image.Image]], seed: int, sigma: float = NOISE_SIGMA) -> list[bytes]:
    """The files of one kind: the bases' own JPEGs for ``small``, else each base upscaled, noised and encoded."""
    if kind.size is None:
        return [data for data, _ in bases]
    return [encode(upscale(img, kind.size, seed + i, sigma), kind.fmt) for i, (_, img) in enumerate(bases)]


# ------------------------------------------------------------------------------------------------ decoders
def decoders(backbone: Backbone) -> tuple[ImageDecoder, ImageDecoder]:
    """The service's decoder, and the same checks and transform decoding every image at full resolution."""
    reduced = ImageDecoder(backbone.eval_transform, MAX_BYTES, MAX_PIXELS)
    full = ImageDecoder(backbone.eval_transform.transform, MAX_BYTES, MAX_PIXELS)  # plain timm: no resize side
    return reduced, full


def target_mark(flag: bool) -> str:
    return "ok" if flag else "MISS"
