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

import contextlib
import io
import math
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from bench import photos_agreement
from bench.common import BenchmarkCommand, CheckFailed, default_weights, latency_summary, run_metadata
from bench.http_e2e import Expected, HttpConfig, batch_stats, check_responses, upload_scenarios
from bench.loadgen import LoadProcess, LoadSpec
from bench.options import fields_from
from bench.photos_shared import KINDS, PhotosConfig, base_images, decoders, make_kind, target_mark
from bench.server import LptServe, ServeOptions, scrape
from lpt.backbone import load_backbone
from lpt.forward import COMPUTE_DTYPES
from service.engine import Engine

TARGET_RATIO = 0.6  # 12 MP JPEG end to end against small images


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


# ------------------------------------------------------------------------------------------------ throughput
def run_photos(cfg: PhotosConfig, argv: list[str], log=print) -> dict[str, Any]:
    """Dispatch: throughput over HTTP, or the top-1 agreement of reduced and full decodes."""
    if cfg.agreement:
        return photos_agreement.run_agreement(cfg, argv, log)
    return run_throughput(cfg, argv, log)


def run_throughput(cfg: PhotosConfig, argv: list[str], log=print) -> dict[str, Any]:
    device = torch.device(cfg.device)
    weights = cfg.weights or default_weights(cfg.backbone)
    backbone = load_backbone(cfg.backbone, weights).to(device)
    engine = Engine(backbone, device, COMPUTE_DTYPES[cfg.dtype])
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
    opts = fields_from(ServeOptions, cfg, weights=weights, threads=cfg.server_threads)
    http_cfg = HttpConfig(backbone=cfg.backbone, scenarios=("1task",), classes=10)
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
                atol = cfg.probability_atol()
                for k in kinds:  # the server must answer what the shared decoder + engine give, for every kind
                    tensors = [reduced(d) for d in images[k.name]]
                    diff = check_responses(srv, scenarios, Expected(engine, images[k.name], tensors, atol))["1task"]
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
def markdown(report: dict[str, Any]) -> str:
    if report["benchmark"] == "photos-agreement":
        return photos_agreement.markdown(report)
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


COMMAND = BenchmarkCommand("photos", PhotosConfig, run_photos, markdown, __doc__)
parse_args = COMMAND.parse_args
main = COMMAND.main
