"""Decode fairness: a quiet tenant's latency while another tenant keeps large PNGs in flight.

A real ``lpt-serve`` (``bench.server.LptServe``) on loopback, the load from ``bench.loadgen`` in its own process:

1. ``beta alone``: tenant ``beta``, one closed-loop client sending a small image.
2. ``beta while alpha floods``: the same, while tenant ``alpha`` keeps ``--flood-clients`` requests in flight,
   each a solid-colour PNG of ``--large-side`` pixels (a few hundred KB that cost about a second of CPU to
   decode). Alpha's requests beyond its decode budget answer 429 at once; its clients send the next at once.

Target: beta's p50 while alpha floods stays within 3x of beta's p50 alone. Percentiles are
``bench.common.percentile``'s. ``--json`` writes the full report; a summary table is printed.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from bench.common import BenchmarkCommand, checklist, noise_jpeg, percentile, run_metadata
from bench.loadgen import LoadProcess, LoadSpec, Target
from bench.options import ServedBackbone, fields_from, option
from bench.server import LptServe, ServeOptions

TENANTS = {"alpha": "alpha-fairness-key-0123", "beta": "beta-fairness-key-45678"}
TASK = "demo"
TARGET_RATIO = 3.0


@dataclass
class FairnessConfig(ServedBackbone):
    """Defaults: DeiT-Tiny (random weights) on the CPU, alpha keeping 12 PNGs of 6000 x 6600 pixels in flight."""

    phase_s: float = option(20.0, help="measured seconds per phase")
    flood_clients: int = option(12, help="alpha's requests in flight")
    large_side: tuple[int, ...] = option((6000, 6600), help="width,height of alpha's PNG")
    threads: int | None = option(None, help="OMP threads of the server process")


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def spec(url: str, tenant: str, image: bytes, clients: int, duration_s: float) -> LoadSpec:
    return LoadSpec(
        url=url,
        targets=[Target(TASK, TENANTS[tenant])],
        images=[image],
        mode="closed",
        concurrency=clients,
        duration_s=duration_s,
        warmup_s=2.0,
        timeout_s=60.0,
    )


def row(result: dict[str, Any]) -> dict[str, Any]:
    ok = result["latencies_s"]
    return {
        "requests": result["requests"],
        "statuses": result["statuses"],
        "ok_p50_ms": percentile(ok, 50) * 1000,
        "ok_p99_ms": percentile(ok, 99) * 1000,
        "ok_rps": len(ok) / result["window_s"],
    }


def run_fairness(cfg: FairnessConfig, argv: list[str], log=print) -> dict[str, Any]:
    opts = fields_from(ServeOptions, cfg)
    large = png((cfg.large_side[0], cfg.large_side[1]), (90, 140, 200))
    report: dict[str, Any] = {
        "benchmark": "fairness",
        "config": asdict(cfg),
        "machine": run_metadata(torch.device("cpu"), ["fairness", *argv]),
        "large_png_bytes": len(large),
        "phases": {},
    }
    with LoadProcess() as load, LptServe(opts, TENANTS) as serve:
        serve.upload_demo_set(TASK)
        quiet = noise_jpeg(240, 320, quality=90)
        (alone,) = load.run_together([spec(serve.url, "beta", quiet, 1, cfg.phase_s)])
        report["phases"]["beta_alone"] = row(alone)
        log(f"[fairness] beta alone: p50 {report['phases']['beta_alone']['ok_p50_ms']:.1f} ms")
        flood, during = load.run_together(
            [
                spec(serve.url, "alpha", large, cfg.flood_clients, cfg.phase_s),
                spec(serve.url, "beta", quiet, 1, cfg.phase_s),
            ]
        )
        report["phases"]["beta_while_alpha_floods"] = row(during)
        report["phases"]["alpha_flooding"] = row(flood)
    phases = report["phases"]
    ratio = phases["beta_while_alpha_floods"]["ok_p50_ms"] / phases["beta_alone"]["ok_p50_ms"]
    report["p50_ratio"] = ratio
    report["checks"] = {f"beta's p50 while alpha floods within {TARGET_RATIO:g}x of alone": ratio <= TARGET_RATIO}
    return report


def markdown(report: dict[str, Any]) -> str:
    rows = ["| phase | requests | statuses | p50 ms | p99 ms | ok req/s |", "|---|---|---|---|---|---|"]
    for name, r in report["phases"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        times = f"{r['ok_p50_ms']:.1f} | {r['ok_p99_ms']:.1f} | {r['ok_rps']:.1f}"
        rows.append(f"| {name} | {r['requests']} | {statuses} | {times} |")
    rows += ["", f"beta p50 ratio (flood / alone): {report['p50_ratio']:.2f}", ""]
    rows += checklist(report["checks"])
    return "\n".join(rows)


COMMAND = BenchmarkCommand("fairness", FairnessConfig, run_fairness, markdown, __doc__)
parse_args = COMMAND.parse_args
main = COMMAND.main
