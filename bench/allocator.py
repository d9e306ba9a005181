"""``python -m bench allocator``: the host allocator setting (``lpt.host_memory``) on and off, in fresh processes.

The setting is process-wide and must come before the large allocations, so the two sides cannot share one
process. Each round starts one worker process per side (the side that goes first alternates), and every worker
times the same forwards: timm's plain forward and ``prompted_forward`` for one LPT set and for its deep-VPT
set (pool dropped), with its shared keys/values precomputed as the service keeps them. Reported: per side and
variant, the median over rounds of each worker's median time per call, and the paired median of
``glibc / retained`` per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench.common import REPO, default_weights
from bench.engine import CLOCKS, EngineConfig, make_registry, precompute_kvs, without_pool
from bench.options import BackboneOptions, config_parser, option, parse_config, to_argv
from lpt.backbone import load_backbone
from lpt.forward import PromptBank, prompted_forward
from lpt.host_memory import RETAIN_BYTES, retain_freed_memory

SIDES = {"retained": None, "glibc": 0}  # side -> retain bytes (None: lpt.host_memory's default)
VARIANTS = ("plain", "lpt", "deep_vpt")


@dataclass
class AllocatorConfig(BackboneOptions):
    """Defaults: DeiT-Tiny, batch 16, one torch thread timed by process CPU time, five rounds."""

    batch: int = option(16)
    threads: int = option(1, help="torch threads per worker")
    clock: str = option("cpu", choices=sorted(CLOCKS))
    rounds: int = option(5, help="pairs of worker processes")
    calls: int = option(10, help="timed calls per variant and worker")
    warmup: int = option(2)

    def __post_init__(self) -> None:
        if min(self.batch, self.threads, self.rounds, self.calls) < 1 or self.warmup < 0:
            raise ValueError("--batch, --threads, --rounds and --calls must be >= 1, --warmup >= 0")


def worker(cfg: AllocatorConfig, retain: int | None) -> dict[str, float]:
    """In a fresh process: apply (or not) the setting, then time every variant; median ms per call.

    Args:
        cfg: what to time.
        retain: bytes to retain (None: ``lpt.host_memory``'s default; 0: glibc's defaults).
    """
    # Before the backbone's and the forwards' allocations, as lpt-serve applies it.
    retained = retain_freed_memory(RETAIN_BYTES if retain is None else retain)
    torch.set_num_threads(cfg.threads)
    backbone = load_backbone(cfg.backbone, weights=cfg.weights or default_weights(cfg.backbone))
    model = backbone.model
    single, _ = make_registry(backbone, EngineConfig(backbone=cfg.backbone, tasks=1))
    vpt = without_pool(single)
    kvs = precompute_kvs(model, [single, vpt])
    banks = {name: PromptBank.stack([ps], shared_kv=[kvs[id(ps)]]) for name, ps in (("lpt", single), ("deep_vpt", vpt))}
    images = torch.randn(cfg.batch, *backbone.info.input_size, generator=torch.Generator().manual_seed(0))
    fns = {
        "plain": lambda: model.forward_head(model.forward_features(images), pre_logits=True),
        "lpt": lambda: prompted_forward(model, images, banks["lpt"]),
        "deep_vpt": lambda: prompted_forward(model, images, banks["deep_vpt"]),
    }
    clock = CLOCKS[cfg.clock]
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for i in range(cfg.calls + cfg.warmup):
            for name, fn in fns.items():  # interleaved, so a slow phase of the machine hits all variants
                start = clock()
                fn()
                if i >= cfg.warmup:
                    times[name].append((clock() - start) * 1000)
    return {"retained": float(retained), **{name: statistics.median(t) for name, t in times.items()}}


def run(cfg: AllocatorConfig, log=print) -> dict[str, Any]:
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(cfg.rounds):
        order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
        result = {}
        for side in order:
            cmd = [sys.executable, "-m", "bench", "allocator", "--worker", *to_argv(cfg)]
            if SIDES[side] is not None:
                cmd += ["--retain", str(SIDES[side])]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
            result[side] = json.loads(out.strip().splitlines()[-1])
        rounds.append(result)
        log(f"  round {r + 1}: " + "; ".join(f"{s} " + _fmt(result[s]) for s in SIDES))
    summary = {side: {v: statistics.median(rd[side][v] for rd in rounds) for v in VARIANTS} for side in SIDES}
    speedup = {v: statistics.median(rd["glibc"][v] / rd["retained"][v] for rd in rounds) for v in VARIANTS}
    ratios = {
        side: {v: statistics.median(rd[side]["plain"] / rd[side][v] for rd in rounds) for v in VARIANTS[1:]}
        for side in SIDES
    }
    return {
        "benchmark": "allocator",
        "config": asdict(cfg),
        "applied": {side: bool(rounds[0][side]["retained"]) for side in SIDES},
        "rounds": rounds,
        "median_ms": summary,
        "speedup_retained": speedup,
        "x_plain": ratios,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _fmt(row: dict[str, float]) -> str:
    return ", ".join(f"{v} {row[v]:.0f} ms" for v in VARIANTS)


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"{cfg['backbone']}, batch {cfg['batch']}, {cfg['threads']} threads, clock {cfg['clock']}, "
        f"{cfg['rounds']} rounds of fresh processes, {report['date']}",
        "",
        "| variant | glibc defaults ms | retained ms | glibc / retained | x plain, glibc | x plain, retained |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        g, r = report["median_ms"]["glibc"][v], report["median_ms"]["retained"][v]
        xg = report["x_plain"]["glibc"].get(v, 1.0)
        xr = report["x_plain"]["retained"].get(v, 1.0)
        lines.append(f"| {v} | {g:.1f} | {r:.1f} | {report['speedup_retained'][v]:.2f} | {xg:.2f} | {xr:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[AllocatorConfig, argparse.Namespace]:
    """Command-line options -> (config, namespace with ``json`` and the worker's hidden ``worker`` and ``retain``)."""
    parser = config_parser(AllocatorConfig, "python -m bench allocator", __doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--retain", type=int, default=None, help=argparse.SUPPRESS)
    return parse_config(parser, AllocatorConfig, argv)


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(cfg, args.retain)))
        return 0
    report = run(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(markdown(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0
