"""Overload benchmark: a real ``lpt-serve`` on loopback driven past its capacity.

Phases, each against the same server (``bench.common.LptServe``), with the load generated in a separate
spawned process (httpx async, no torch) so it never shares an interpreter with the server:

1. ``unloaded``: one closed-loop client; the p99 every later phase is compared with.
2. ``capacity``: closed loop with ``2 x max_batch_size`` clients; completed requests/s is the capacity.
3. ``2x`` and ``5x``: open-loop Poisson arrivals at that multiple of the capacity. Checks: 429 rejections answer
   in < 10 ms (p99), accepted requests' p99 stays within 2x the unloaded p99.
4. ``fairness``: tenant ``beta`` at a quarter of the capacity, alone, then while ``alpha`` floods at 5x.
   Check: beta's p99 rises by at most 50 %.
5. ``soak``: 2x for ``--soak-s`` seconds, sampling the server's queue depth (``lpt_queue_depth``) and RSS
   every second. Check: the queue never exceeds ``--queue-size`` and RSS stops growing (last fifth vs the
   first fifth of the soak).

Loopback only, every phase bounded in time. ``--json`` writes the full report; a summary table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import httpx

TENANTS = {"alpha": "alpha-overload-key-0123", "beta": "beta-overload-key-45678"}
REJECT_P99_S = 0.010
ACCEPTED_P99_RATIO = 2.0
FAIRNESS_RATIO = 1.5


# -- load generation (runs in the spawned child; stdlib + httpx only) ----------------------------------------
@dataclass
class Stream:
    """One tenant's traffic: ``closed`` (``concurrency`` clients back to back) or ``open`` (Poisson at ``rate``)."""

    tenant: str
    secret: str
    mode: str = "open"
    rate: float = 0.0
    concurrency: int = 1
    seed: int = 0


@dataclass
class Phase:
    url: str
    image: bytes
    streams: list[Stream]
    duration_s: float
    warmup_s: float = 1.0
    timeout_s: float = 30.0
    max_in_flight: int = 1024


async def _generate(phase: Phase) -> list[tuple[str, float, float, int]]:
    """Records ``(tenant, start, end, status)`` for requests started inside the measured window."""
    records: list[tuple[str, float, float, int]] = []
    t0 = time.perf_counter()
    w0, w1 = t0 + phase.warmup_s, t0 + phase.warmup_s + phase.duration_s
    limits = httpx.Limits(max_connections=phase.max_in_flight, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=phase.url, limits=limits, timeout=phase.timeout_s) as client:

        async def one(s: Stream) -> None:
            start = time.perf_counter()
            try:
                r = await client.post(
                    "/v1/classify",
                    params={"task": "demo", "top_k": 1},
                    content=phase.image,
                    headers={"Authorization": f"Bearer {s.secret}", "Content-Type": "image/jpeg"},
                )
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            if w0 <= start < w1:
                records.append((s.tenant, start, time.perf_counter(), status))

        async def closed(s: Stream) -> None:
            while time.perf_counter() < w1:
                await one(s)

        async def open_loop(s: Stream) -> None:
            rng = random.Random(s.seed)
            in_flight: set[asyncio.Task] = set()
            next_at = time.perf_counter()
            while next_at < w1:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(in_flight) < phase.max_in_flight:
                    task = asyncio.ensure_future(one(s))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                elif w0 <= next_at < w1:
                    records.append((s.tenant, next_at, next_at, -1))  # the client-side cap: never sent
                next_at += rng.expovariate(s.rate)
            if in_flight:  # bounded: what has not answered by then is cancelled (and not recorded)
                _, late = await asyncio.wait(in_flight, timeout=phase.timeout_s)
                for task in late:
                    task.cancel()

        runners = []
        for s in phase.streams:
            if s.mode == "closed":
                runners += [closed(s) for _ in range(s.concurrency)]
            else:
                runners.append(open_loop(s))
        await asyncio.gather(*runners)
    return records


def generate(phase: Phase) -> list[tuple[str, float, float, int]]:
    return asyncio.run(_generate(phase))


# -- statistics ---------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarise(records: list[tuple[str, float, float, int]], duration_s: float, tenant: str | None = None) -> dict:
    rows = [r for r in records if tenant is None or r[0] == tenant]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r[3])] = statuses.get(str(r[3]), 0) + 1
    ok = [r[2] - r[1] for r in rows if r[3] == 200]
    rejected = [r[2] - r[1] for r in rows if r[3] == 429]
    ms = 1000.0
    return {
        "requests": len(rows),
        "offered_rps": len(rows) / duration_s,
        "ok_rps": len(ok) / duration_s,
        "statuses": statuses,
        "ok_p50_ms": pct(ok, 50) * ms,
        "ok_p99_ms": pct(ok, 99) * ms,
        "reject_p50_ms": pct(rejected, 50) * ms,
        "reject_p99_ms": pct(rejected, 99) * ms,
        "reject_max_ms": (max(rejected) * ms) if rejected else float("nan"),
        "errors": sum(n for s, n in statuses.items() if s not in ("200", "429")),
    }


# -- server-side sampling -----------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def queue_depth(client: httpx.Client, url: str) -> float:
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith("lpt_queue_depth "):
            return float(line.split()[1])
    return float("nan")


class Sampler(threading.Thread):
    """Samples (t, queue depth, RSS) of the server every ``every_s`` until stopped."""

    def __init__(self, url: str, pid: int, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.url, self.pid, self.every_s = url, pid, every_s
        self.samples: list[tuple[float, float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        with httpx.Client(timeout=5.0) as client:
            while not self._halt.is_set():
                with contextlib.suppress(httpx.HTTPError, OSError):
                    self.samples.append((time.monotonic() - t0, queue_depth(client, self.url), rss_bytes(self.pid)))
                self._halt.wait(self.every_s)

    def stop(self) -> list[tuple[float, float, int]]:
        self._halt.set()
        self.join(10)
        return self.samples


# -- the run ------------------------------------------------------------------------------------------------
@dataclass
class OverloadConfig:
    backbone: str = "deit_tiny_patch16_224"
    weights: str = "random:0"
    img_size: int | None = None
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    queue_size: int = 16
    request_timeout: float = 10.0
    phase_s: float = 15.0
    soak_s: float = 60.0
    multiples: list[float] = field(default_factory=lambda: [2.0, 5.0])
    beta_share: float = 0.25
    threads: int | None = None


def run_overload(cfg: OverloadConfig, log=print) -> dict[str, Any]:
    from bench.common import LptServe, ServeOptions  # torch is imported here, never in the load child

    opts = ServeOptions(
        backbone=cfg.backbone,
        weights=cfg.weights,
        img_size=cfg.img_size,
        max_batch_size=cfg.max_batch_size,
        max_wait_ms=cfg.max_wait_ms,
        queue_size=cfg.queue_size,
        request_timeout=cfg.request_timeout,
        threads=cfg.threads,
    )
    report: dict[str, Any] = {"config": asdict(cfg), "phases": {}}
    pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
    try:
        with LptServe(opts, TENANTS) as serve:
            upload_demo(serve)
            image = demo_image(cfg)

            def phase(name: str, streams: list[Stream], duration: float) -> list[tuple[str, float, float, int]]:
                started = time.monotonic()
                spec = Phase(url=serve.url, image=image, streams=streams, duration_s=duration)
                records = pool.submit(generate, spec).result(timeout=spec.warmup_s + duration + 2 * spec.timeout_s + 60)
                log(f"[overload] {name}: {duration:.0f} s measured, {time.monotonic() - started:.0f} s wall")
                return records

            alpha = lambda **kw: Stream("alpha", TENANTS["alpha"], **kw)  # noqa: E731
            beta = lambda **kw: Stream("beta", TENANTS["beta"], **kw)  # noqa: E731

            rec = phase("unloaded", [alpha(mode="closed", concurrency=1)], cfg.phase_s)
            unloaded = report["phases"]["unloaded"] = summarise(rec, cfg.phase_s)
            rec = phase("capacity", [alpha(mode="closed", concurrency=2 * cfg.max_batch_size)], cfg.phase_s)
            cap = report["phases"]["capacity"] = summarise(rec, cfg.phase_s)
            capacity = cap["ok_rps"]
            report["capacity_rps"] = capacity
            log(f"[overload] unloaded p99 {unloaded['ok_p99_ms']:.1f} ms, capacity {capacity:.1f} req/s")

            for m in cfg.multiples:
                rec = phase(f"{m:g}x", [alpha(rate=m * capacity, seed=int(m))], cfg.phase_s)
                s = report["phases"][f"{m:g}x"] = summarise(rec, cfg.phase_s)
                s["accepted_p99_vs_unloaded"] = s["ok_p99_ms"] / unloaded["ok_p99_ms"]

            beta_rate = cfg.beta_share * capacity
            rec = phase("fairness: beta alone", [beta(rate=beta_rate, seed=11)], cfg.phase_s)
            alone = report["phases"]["beta_alone"] = summarise(rec, cfg.phase_s, "beta")
            streams = [alpha(rate=5 * capacity, seed=12), beta(rate=beta_rate, seed=11)]
            rec = phase("fairness: beta while alpha floods at 5x", streams, cfg.phase_s)
            flood = report["phases"]["beta_during_flood"] = summarise(rec, cfg.phase_s, "beta")
            report["phases"]["alpha_flooding"] = summarise(rec, cfg.phase_s, "alpha")
            flood["p99_vs_alone"] = flood["ok_p99_ms"] / alone["ok_p99_ms"]

            sampler = Sampler(serve.url, serve.proc.pid)
            sampler.start()
            rec = phase("soak at 2x", [alpha(rate=2 * capacity, seed=21)], cfg.soak_s)
            samples = sampler.stop()
            soak = report["phases"]["soak"] = summarise(rec, cfg.soak_s)
            soak.update(soak_stats(samples, cfg.queue_size))
            report["server_log_tail"] = serve.log_tail(10)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    report["checks"] = checks(report, cfg)
    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    return report


def soak_stats(samples: list[tuple[float, float, int]], queue_size: int) -> dict[str, Any]:
    depths = [d for _, d, _ in samples if not math.isnan(d)]
    rss = [r for _, _, r in samples if r]
    fifth = max(1, len(rss) // 5)
    first, last = rss[:fifth], rss[-fifth:]
    mib = 1024.0**2
    return {
        "samples": len(samples),
        "queue_depth_max": max(depths) if depths else float("nan"),
        "queue_depth_mean": sum(depths) / len(depths) if depths else float("nan"),
        "queue_size": queue_size,
        "rss_first_fifth_mib": (sum(first) / len(first) / mib) if first else float("nan"),
        "rss_last_fifth_mib": (sum(last) / len(last) / mib) if last else float("nan"),
        "rss_max_mib": (max(rss) / mib) if rss else float("nan"),
        "rss_growth_pct": (100.0 * (sum(last) / len(last) / (sum(first) / len(first)) - 1)) if first else float("nan"),
    }


def checks(report: dict[str, Any], cfg: OverloadConfig) -> dict[str, bool]:
    p = report["phases"]
    out: dict[str, bool] = {}
    for m in cfg.multiples:
        s = p[f"{m:g}x"]
        out[f"{m:g}x: 429 p99 < 10 ms"] = s["reject_p99_ms"] < REJECT_P99_S * 1000
        out[f"{m:g}x: accepted p99 <= 2x unloaded p99"] = s["accepted_p99_vs_unloaded"] <= ACCEPTED_P99_RATIO
        out[f"{m:g}x: no 5xx or transport errors"] = s["errors"] == 0
    out["fairness: beta p99 +<= 50 %"] = p["beta_during_flood"]["p99_vs_alone"] <= FAIRNESS_RATIO
    soak = p["soak"]
    out["soak: queue depth <= queue size"] = soak["queue_depth_max"] <= cfg.queue_size
    out["soak: RSS growth < 10 % (last vs first fifth)"] = soak["rss_growth_pct"] < 10.0
    return out


def upload_demo(serve) -> None:
    """``--demo`` is not passed by LptServe: push one demo-like set for both tenants."""
    from lpt.backbone import load_backbone
    from lpt.init import init_prompt_set
    from lpt.prompt_set import encode

    o = serve.opts
    info = load_backbone(o.backbone, o.weights, o.img_size).info
    data = encode(init_prompt_set(info, [f"c{i}" for i in range(10)], prompt_length=10, pool_size=8, seed=0))
    with httpx.Client(timeout=60) as c:
        for tenant in TENANTS:
            r = c.post(f"{serve.url}/v1/prompts", params={"task": "demo"}, content=data, headers=serve.headers(tenant))
            r.raise_for_status()


def demo_image(cfg: OverloadConfig) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def markdown(report: dict[str, Any]) -> str:
    p = report["phases"]
    rows = ["| phase | offered req/s | 200/s | 429 | other | ok p50 ms | ok p99 ms | 429 p50 ms | 429 p99 ms |"]
    rows.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in p.items():
        rows.append(
            f"| {name} | {s['offered_rps']:.1f} | {s['ok_rps']:.1f} | {s['statuses'].get('429', 0)} | {s['errors']} "
            f"| {s['ok_p50_ms']:.1f} | {s['ok_p99_ms']:.1f} | {s['reject_p50_ms']:.2f} | {s['reject_p99_ms']:.2f} |"
        )
    soak = p["soak"]
    rows.append("")
    rows.append(
        f"capacity {report['capacity_rps']:.1f} req/s; soak {soak['samples']} samples: queue depth max "
        f"{soak['queue_depth_max']:.0f} / {soak['queue_size']}, RSS {soak['rss_first_fifth_mib']:.0f} -> "
        f"{soak['rss_last_fifth_mib']:.0f} MiB (max {soak['rss_max_mib']:.0f}, {soak['rss_growth_pct']:+.1f} %)"
    )
    rows.append("")
    rows += [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    return "\n".join(rows)


def parse_args(argv: list[str]) -> tuple[OverloadConfig, Path | None]:
    d = OverloadConfig()
    p = argparse.ArgumentParser(prog="python -m bench overload", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default=d.backbone)
    p.add_argument("--weights", default=d.weights)
    p.add_argument("--img-size", type=int, default=d.img_size)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms)
    p.add_argument("--queue-size", type=int, default=d.queue_size, help="server queue (images) before 429")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout)
    p.add_argument("--phase-s", type=float, default=d.phase_s, help="measured seconds per phase")
    p.add_argument("--soak-s", type=float, default=d.soak_s, help="soak length at 2x (the issue's run: 300)")
    p.add_argument("--threads", type=int, default=None, help="OMP threads of the server process")
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    a = p.parse_args(argv)
    cfg = OverloadConfig(
        backbone=a.backbone,
        weights=a.weights,
        img_size=a.img_size,
        max_batch_size=a.max_batch_size,
        max_wait_ms=a.max_wait_ms,
        queue_size=a.queue_size,
        request_timeout=a.request_timeout,
        phase_s=a.phase_s,
        soak_s=a.soak_s,
        threads=a.threads,
    )
    return cfg, a.json


def main(argv: list[str] | None = None) -> int:
    cfg, out = parse_args(list(sys.argv[1:] if argv is None else argv))
    report = run_overload(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report["command"] = "python -m bench overload " + " ".join(sys.argv[1:] if argv is None else argv)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
    print(markdown(report))
    return 0
