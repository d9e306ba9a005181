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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SIDES = {"retained": None, "glibc": 0}  # side -> retain bytes (None: lpt.host_memory's default)
VARIANTS = ("plain", "lpt", "deep_vpt")


def worker(args: argparse.Namespace) -> dict[str, float]:
    """In a fresh process: apply (or not) the setting, then time every variant; median ms per call."""
    from lpt.host_memory import RETAIN_BYTES, retain_freed_memory

    retained = retain_freed_memory(RETAIN_BYTES if args.retain is None else args.retain)
    import torch

    from bench.engine import CLOCKS, EngineConfig, default_weights, make_registry, precompute_kvs, without_pool
    from lpt.backbone import load_backbone
    from lpt.forward import PromptBank, prompted_forward

    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone, weights=args.weights or default_weights(args.backbone))
    model = backbone.model
    single, _ = make_registry(backbone, EngineConfig(backbone=args.backbone, tasks=1))
    vpt = without_pool(single)
    kvs = precompute_kvs(model, [single, vpt])
    banks = {name: PromptBank.stack([ps], shared_kv=[kvs[id(ps)]]) for name, ps in (("lpt", single), ("deep_vpt", vpt))}
    images = torch.randn(args.batch, *backbone.info.input_size, generator=torch.Generator().manual_seed(0))
    fns = {
        "plain": lambda: model.forward_head(model.forward_features(images), pre_logits=True),
        "lpt": lambda: prompted_forward(model, images, banks["lpt"]),
        "deep_vpt": lambda: prompted_forward(model, images, banks["deep_vpt"]),
    }
    clock = CLOCKS[args.clock]
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for i in range(args.calls + args.warmup):
            for name, fn in fns.items():  # interleaved, so a slow phase of the machine hits all variants
                start = clock()
                fn()
                if i >= args.warmup:
                    times[name].append((clock() - start) * 1000)
    return {"retained": float(retained), **{name: statistics.median(t) for name, t in times.items()}}


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
        result = {}
        for side in order:
            cmd = [sys.executable, "-m", "bench", "allocator", "--worker", *_shared_flags(args)]
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
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "retain", "json")},
        "applied": {side: bool(rounds[0][side]["retained"]) for side in SIDES},
        "rounds": rounds,
        "median_ms": summary,
        "speedup_retained": speedup,
        "x_plain": ratios,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _fmt(row: dict[str, float]) -> str:
    return ", ".join(f"{v} {row[v]:.0f} ms" for v in VARIANTS)


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--backbone", args.backbone, "--batch", str(args.batch), "--threads", str(args.threads)]
    flags += ["--calls", str(args.calls), "--warmup", str(args.warmup), "--clock", args.clock]
    return flags + (["--weights", args.weights] if args.weights else [])


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench allocator", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="deit_tiny_patch16_224")
    p.add_argument("--weights", default=None, help="hub | PATH | random:SEED (default: the shared DeiT-Tiny file)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    p.add_argument("--rounds", type=int, default=5, help="pairs of worker processes")
    p.add_argument("--calls", type=int, default=10, help="timed calls per variant and worker")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--retain", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if min(a.batch, a.threads, a.rounds, a.calls) < 1 or a.warmup < 0:
        p.error("--batch, --threads, --rounds and --calls must be >= 1, --warmup >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    report = run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(markdown(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0
