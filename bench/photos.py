"""Photos as users send them: end-to-end img/s of camera-size JPEGs and a large PNG against small images.

Throughput (default): a real ``lpt-serve`` subprocess (the ``bench http`` machinery: same server start, same
load-generator process, same correctness check before timing) serves one task. Kinds of image, each a handful
of distinct deterministic "photos" (CIFAR-10 test images upscaled to the size, plus noise so the files carry
real entropy; seeded noise pictures when the CIFAR zip is absent): ``small`` (the 32 px CIFAR JPEGs themselves),
0.3, 2 and 12 MP JPEGs and a 3 MP PNG. Every repeat runs one closed-loop window per kind, the kinds interleaved
with the starting kind rotating; ``img/s`` is the median over repeats and ``vs small`` the median of the
per-repeat ratios. Decode cost per image is the CPU time of the service's decoder (checks, reduced decode,
orientation, timm eval transform) and, for comparison, of a full-resolution decode with the same transform.

Agreement (``--agreement``): CIFAR-10 test images upscaled to photo sizes (0.3 / 2 / 12 MP in turn), each decoded
both ways; the share of images whose top-1 is the same under the reduced and the full-resolution decode, for a
CIFAR-10 cosine head (class means of DeiT features of CIFAR training images) and for DeiT's own ImageNet-1k
head. Next to it, the same share for a trivial change (the photo saved at JPEG quality 85 instead of 90): how
stable each head's top-1 is on these images in the first place.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import secrets
import statistics
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from bench.common import (
    CIFAR_ZIP,
    DTYPES,
    CheckFailed,
    LptServe,
    ServeOptions,
    default_weights,
    latency_summary,
    run_cli,
    run_metadata,
    scrape,
)
from bench.http_e2e import HttpConfig, batch_stats, check_responses, upload_scenarios
from bench.loadgen import LoadProcess, LoadSpec
from lpt.backbone import load_backbone
from service.engine import Engine
from service.images import ImageDecoder

TARGET_RATIO = 0.6  # 12 MP JPEG end to end against small images
TARGET_AGREEMENT = 0.99
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
class PhotosConfig:
    """Defaults: DeiT-Tiny 224 px on the CPU, the service's batching defaults, 16 closed-loop clients."""

    backbone: str = "deit_tiny_patch16_224"
    weights: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    cifar_zip: Path = CIFAR_ZIP
    per_kind: int = 8
    concurrency: int = 16
    duration_s: float = 20.0
    warmup_s: float = 3.0
    repeats: int = 3
    decode_repeats: int = 3
    server_threads: int | None = None
    agreement: bool = False
    count: int = 300
    per_class: int = 50
    noise: float = NOISE_SIGMA  # grey levels of Gaussian noise on the upscaled photos (0: the upscaled image alone)
    side_factors: tuple[int, ...] = (1,)  # agreement: reduced decodes keeping these multiples of the resize side
    seed: int = 0
    kinds: list[str] = field(default_factory=lambda: [k.name for k in KINDS])
    baseline_repo: Path | None = None  # a second server from this checkout, interleaved (before/after)


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
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


def make_kind(kind: Kind, bases: list[tuple[bytes, Image.Image]], seed: int, sigma: float = NOISE_SIGMA) -> list[bytes]:
    if kind.size is None:
        return [data for data, _ in bases]
    return [encode(upscale(img, kind.size, seed + i, sigma), kind.fmt) for i, (_, img) in enumerate(bases)]


# ------------------------------------------------------------------------------------------------ decode cost
def cpu_ms(fn: Callable[[bytes], Any], datas: list[bytes], repeats: int) -> float:
    """Median CPU milliseconds of this thread per call of ``fn`` (descheduled time on a shared machine left out).

    Torch runs single-threaded meanwhile: the transform's small tensor ops would otherwise count OpenMP spin-waits.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for _ in range(repeats):
            for data in datas:
                start = time.thread_time()
                fn(data)
                times.append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return 1e3 * statistics.median(times)


def decoders(backbone) -> tuple[ImageDecoder, ImageDecoder]:
    """The service's decoder, and the same checks and transform decoding every image at full resolution."""
    reduced = ImageDecoder(backbone.eval_transform, MAX_BYTES, MAX_PIXELS)
    full = ImageDecoder(backbone.eval_transform.transform, MAX_BYTES, MAX_PIXELS)  # plain timm: no resize side
    return reduced, full


# ------------------------------------------------------------------------------------------------ throughput
def run_photos(cfg: PhotosConfig, argv: list[str], log=print) -> dict[str, Any]:
    """Dispatch: throughput over HTTP, or the top-1 agreement of reduced and full decodes."""
    if cfg.agreement:
        from bench.photos_agreement import run_agreement

        return run_agreement(cfg, argv, log)
    return run_throughput(cfg, argv, log)


def run_throughput(cfg: PhotosConfig, argv: list[str], log=print) -> dict[str, Any]:
    device = torch.device(cfg.device)
    weights = cfg.weights or default_weights(cfg.backbone)
    backbone = load_backbone(cfg.backbone, weights).to(device)
    engine = Engine(backbone, device, DTYPES[cfg.dtype])
    reduced, full = decoders(backbone)
    bases = base_images(cfg.per_kind, cfg.cifar_zip, cfg.seed)
    kinds = [k for k in KINDS if k.name in cfg.kinds or k.name == "small"]  # small: what every kind is measured by
    log(f"photos: generating {cfg.per_kind} images of each kind ({', '.join(k.name for k in kinds)})")
    images = {k.name: make_kind(k, bases, cfg.seed + 1000 * i, cfg.noise) for i, k in enumerate(KINDS) if k in kinds}
    report: dict[str, Any] = {
        "benchmark": "photos",
        "config": {**asdict(cfg), "weights": backbone.info.weights, "cifar": Path(cfg.cifar_zip).is_file()},
        "machine": run_metadata(device, ["photos", *argv]),
        "kinds": {},
    }
    for k in kinds:
        datas = images[k.name]
        first = Image.open(io.BytesIO(datas[0]))
        row = report["kinds"][k.name] = {
            "size": list(first.size),
            "format": first.format,
            "mean_bytes": sum(map(len, datas)) / len(datas),
            "decode_cpu_ms": cpu_ms(reduced, datas, cfg.decode_repeats),
            "full_decode_cpu_ms": cpu_ms(full, datas, cfg.decode_repeats),
            "runs": [],
        }
        log(f"  {k.name}: decode {row['decode_cpu_ms']:.1f} ms CPU (full resolution {row['full_decode_cpu_ms']:.1f})")

    keys = {"bench0": secrets.token_hex(16)}
    opts = ServeOptions(
        backbone=cfg.backbone, weights=weights, device=cfg.device, dtype=cfg.dtype, threads=cfg.server_threads
    )
    http_cfg = HttpConfig(backbone=cfg.backbone, scenarios=["1task"], classes=10)
    if cfg.baseline_repo:
        report["baseline"] = {"repo": str(cfg.baseline_repo), "kinds": {k.name: {"runs": []} for k in kinds}}
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(httpx.Client(timeout=120.0))
        load = stack.enter_context(LoadProcess())
        serve = stack.enter_context(LptServe(opts, keys))
        servers = {"this": (serve, report["kinds"])}
        if cfg.baseline_repo:
            base = stack.enter_context(LptServe(opts, keys, repo=cfg.baseline_repo))
            servers["baseline"] = (base, report["baseline"]["kinds"])
        targets = {}
        for name, (srv, _) in servers.items():
            if client.get(f"{srv.url}/v1/backbone").json()["fingerprint"] != backbone.info.fingerprint:
                raise CheckFailed(f"the {name} server runs another backbone than the benchmark")
            scenarios = upload_scenarios(srv, client, http_cfg, backbone, device, cfg.dtype)
            targets[name] = scenarios["1task"].targets
            if name == "this":
                atol = 1e-4 if cfg.dtype == "float32" else 2e-2
                for k in kinds:  # the server must answer what the shared decoder + engine give, for every kind
                    tensors = [reduced(d) for d in images[k.name]]
                    diff = check_responses(srv, scenarios, engine, images[k.name], tensors, atol)["1task"]
                    report["kinds"][k.name]["check_max_diff"] = diff
                log("  checks passed: HTTP answers equal the engine on the shared decoder for every kind")
        for rep in range(cfg.repeats):
            order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
            names = list(servers) if rep % 2 == 0 else list(servers)[::-1]
            for k in order:
                for name in names:
                    srv, rows = servers[name]
                    spec = LoadSpec(
                        url=srv.url,
                        targets=targets[name],
                        images=images[k.name],
                        concurrency=cfg.concurrency,
                        duration_s=cfg.duration_s,
                        warmup_s=cfg.warmup_s,
                        seed=cfg.seed + rep,
                    )
                    before = scrape(client, srv.url)
                    res = load.run(spec)
                    res.update(batch_stats(before, scrape(client, srv.url)))
                    res["latency"] = latency_summary(res.pop("latencies_s"))
                    rows[k.name]["runs"].append(res)
                    log(
                        f"  rep {rep} {name} {k.name}: {res['images_per_s']:.1f} img/s, mean batch "
                        f"{res['mean_batch']:.1f}, p50 {res['latency']['p50_ms']:.0f} ms"
                        f", errors {res['error_rate']:.3f}"
                    )
        report["server_log_tail"] = serve.log_tail(10)
    summarise(report["kinds"])
    if "baseline" in report:
        summarise(report["baseline"]["kinds"])
    return report


def summarise(kinds: dict[str, dict[str, Any]]) -> None:
    """Median img/s per kind and the median over repeats of each repeat's ratio to the small images."""
    small = [r["images_per_s"] for r in kinds["small"]["runs"]]
    for row in kinds.values():
        ips = [r["images_per_s"] for r in row["runs"]]
        row["images_per_s"] = statistics.median(ips)
        row["vs_small"] = statistics.median(a / b for a, b in zip(ips, small, strict=True) if b > 0)
        row["error_rate"] = max(r["error_rate"] for r in row["runs"])
        row["mean_batch"] = statistics.median(r.get("mean_batch", 0.0) for r in row["runs"])
        row["p50_ms"] = statistics.median(r.get("latency", {}).get("p50_ms", math.nan) for r in row["runs"])


# ------------------------------------------------------------------------------------------------ output
def target_mark(flag: bool) -> str:
    return "ok" if flag else "MISS"


def agreement_markdown(report: dict[str, Any]) -> str:
    from bench.photos_agreement import markdown as agreement

    return agreement(report)


def markdown(report: dict[str, Any]) -> str:
    if report["benchmark"] == "photos-agreement":
        return agreement_markdown(report)
    lines = [
        "| kind | size | format | mean KB | img/s | vs small | mean batch | p50 ms | errors % | decode CPU ms "
        "| full-resolution decode CPU ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["kinds"].items():
        lines.append(
            f"| {name} | {row['size'][0]}x{row['size'][1]} | {row['format']} | {row['mean_bytes'] / 1024:.0f} "
            f"| {row['images_per_s']:.1f} | {row['vs_small']:.2f} | {row['mean_batch']:.1f} | {row['p50_ms']:.0f} "
            f"| {100 * row['error_rate']:.1f} "
            f"| {row['decode_cpu_ms']:.1f} | {row['full_decode_cpu_ms']:.1f} |"
        )
    if "baseline" in report:
        lines += ["", f"baseline server ({report['baseline']['repo']}), interleaved with the runs above:", ""]
        lines += ["| kind | img/s | vs small | mean batch | p50 ms |", "|---|---:|---:|---:|---:|"]
        for name, row in report["baseline"]["kinds"].items():
            lines.append(
                f"| {name} | {row['images_per_s']:.1f} | {row['vs_small']:.2f} | {row['mean_batch']:.1f} "
                f"| {row['p50_ms']:.0f} |"
            )
    if "12MP" in report["kinds"]:
        ratio = report["kinds"]["12MP"]["vs_small"]
        mark = target_mark(ratio >= TARGET_RATIO)
        lines.append(f"\n12 MP JPEG vs small images: {ratio:.2f} ({mark} >= {TARGET_RATIO})")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[PhotosConfig, Path | None]:
    d = PhotosConfig()
    p = argparse.ArgumentParser(prog="python -m bench photos", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default=d.backbone)
    p.add_argument("--weights", default=None, help="hub | PATH | random:SEED (default: shared DeiT-Tiny if present)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES))
    p.add_argument("--cifar-zip", type=Path, default=d.cifar_zip, help="CIFAR-10 JPEG zip the photos start from")
    p.add_argument("--per-kind", type=int, default=d.per_kind, help="distinct images of each kind")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="closed-loop clients")
    p.add_argument("--duration", type=float, default=d.duration_s, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=d.warmup_s, help="unmeasured lead-in seconds per run")
    p.add_argument("--repeats", type=int, default=d.repeats, help="rounds over all kinds (start rotating)")
    p.add_argument("--decode-repeats", type=int, default=d.decode_repeats)
    p.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    p.add_argument("--baseline-repo", type=Path, default=None, help="checkout of a baseline server to interleave")
    p.add_argument("--kinds", default=",".join(d.kinds), help="kinds to run (small always runs)")
    p.add_argument("--agreement", action="store_true", help="top-1 agreement of reduced and full decodes instead")
    p.add_argument("--count", type=int, default=d.count, help="images of the agreement run")
    p.add_argument("--per-class", type=int, default=d.per_class, help="CIFAR-10 training images per class mean")
    p.add_argument(
        "--noise", type=float, default=d.noise, help="grey levels of Gaussian noise on the photos (0: upscaled only)"
    )
    p.add_argument(
        "--side-factors",
        default=",".join(map(str, d.side_factors)),
        help="agreement: also compare reduced decodes that keep these multiples of the resize side (1: the service's)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    unknown = set(a.kinds.split(",")) - {k.name for k in KINDS} - {""}
    if unknown:
        p.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(k.name for k in KINDS)}")
    cfg = PhotosConfig(
        backbone=a.backbone,
        weights=a.weights,
        device=a.device,
        dtype=a.dtype,
        cifar_zip=a.cifar_zip,
        per_kind=a.per_kind,
        concurrency=a.concurrency,
        duration_s=a.duration,
        warmup_s=a.warmup,
        repeats=a.repeats,
        decode_repeats=a.decode_repeats,
        server_threads=a.server_threads,
        agreement=a.agreement,
        count=a.count,
        per_class=a.per_class,
        noise=a.noise,
        side_factors=tuple(sorted({int(f) for f in a.side_factors.split(",") if f.strip()})),
        seed=a.seed,
        kinds=[k.strip() for k in a.kinds.split(",") if k.strip()],
        baseline_repo=a.baseline_repo,
    )
    return cfg, a.json


def main(argv: list[str] | None = None) -> int:
    return run_cli("photos", argv, parse_args, run_photos, markdown)
