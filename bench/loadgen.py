"""HTTP load generator for ``/v1/classify``: closed loop (N concurrent clients) or open loop (Poisson arrivals).

Runs in its own process (``run_in_process``), so its CPU time and event loop never share an interpreter
with the server or with the engine timings of the benchmark process. Imports only the standard library
and httpx (no torch): the child starts fast and small. Every run is bounded by a request count and a
wall-clock deadline.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import httpx


@dataclass
class Target:
    """One (tenant, task) the generator may hit, with its API key and popularity weight."""

    task: str
    secret: str
    weight: float = 1.0


@dataclass
class LoadSpec:
    """What one load run does.

    Attributes:
        url: server base URL (loopback).
        targets: tasks to hit, chosen per request by weight.
        images: encoded images, cycled.
        mode: ``closed`` (``concurrency`` clients, each sends its next request when the last returns) or
            ``open`` (Poisson arrivals at ``rate`` requests/s, at most ``concurrency`` in flight).
        concurrency: closed-loop clients, or the open-loop in-flight cap (arrivals past it count as dropped).
        rate: open-loop arrival rate (requests/s).
        duration_s: length of the measured window.
        warmup_s: requests in this lead-in are sent but not measured.
        max_requests: hard cap on requests sent (warm-up included).
        timeout_s: client-side timeout per request.
        seed: task/image choice and arrival times.
    """

    url: str
    targets: list[Target]
    images: list[bytes]
    mode: str = "closed"
    concurrency: int = 1
    rate: float = 0.0
    duration_s: float = 10.0
    warmup_s: float = 1.0
    max_requests: int = 100_000
    timeout_s: float = 60.0
    seed: int = 0
    top_k: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    """Popularity of rank i (1-based) proportional to 1 / i**s, normalised to sum 1."""
    raw = [1.0 / (i**s) for i in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class _Picker:
    def __init__(self, targets: list[Target], rng: random.Random):
        self.targets = targets
        self.rng = rng
        total, acc = sum(t.weight for t in targets), 0.0
        self.cum = []
        for t in targets:
            acc += t.weight / total
            self.cum.append(acc)

    def __call__(self) -> Target:
        i = bisect.bisect_left(self.cum, self.rng.random() * self.cum[-1])
        return self.targets[min(i, len(self.targets) - 1)]


async def _run(spec: LoadSpec) -> dict[str, Any]:
    rng = random.Random(spec.seed)
    pick = _Picker(spec.targets, rng)
    records: list[tuple[float, float, int]] = []  # (start, end, status); status 0 = transport error/timeout
    sent = 0
    t0 = time.perf_counter()
    window_start = t0 + spec.warmup_s
    window_end = window_start + spec.duration_s
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
    timeout = httpx.Timeout(spec.timeout_s)
    async with httpx.AsyncClient(base_url=spec.url, limits=limits, timeout=timeout) as client:

        async def one(target: Target, image: bytes) -> None:
            start = time.perf_counter()
            try:
                resp = await client.post(
                    "/v1/classify",
                    params={"task": target.task, "top_k": spec.top_k},
                    content=image,
                    headers={"Authorization": f"Bearer {target.secret}", "Content-Type": "image/jpeg"},
                )
                status = resp.status_code
            except httpx.HTTPError:
                status = 0
            records.append((start, time.perf_counter(), status))

        def next_request() -> tuple[Target, bytes]:
            nonlocal sent
            image = spec.images[sent % len(spec.images)]
            sent += 1
            return pick(), image

        if spec.mode == "closed":

            async def client_loop() -> None:
                while time.perf_counter() < window_end and sent < spec.max_requests:
                    await one(*next_request())

            await asyncio.gather(*(client_loop() for _ in range(spec.concurrency)))
        elif spec.mode == "open":
            in_flight: set[asyncio.Task] = set()
            dropped = 0
            next_at = time.perf_counter()
            while next_at < window_end and sent < spec.max_requests:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(in_flight) >= spec.concurrency:
                    dropped += 1
                    records.append((next_at, next_at, -1))  # -1: never sent, the client-side cap was hit
                else:
                    task = asyncio.ensure_future(one(*next_request()))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                next_at += rng.expovariate(spec.rate)
            if in_flight:
                await asyncio.wait(in_flight, timeout=spec.timeout_s)
        else:
            raise ValueError(f"unknown mode {spec.mode!r}")
    return _summarise(records, window_start, window_end, sent)


def _summarise(records: list[tuple[float, float, int]], w0: float, w1: float, sent: int) -> dict[str, Any]:
    """Throughput counts completions inside the window; latencies are of requests started inside it."""
    in_window = [r for r in records if w0 <= r[0] < w1]
    done_in_window = [r for r in records if w0 <= r[1] < w1 and r[2] == 200]
    statuses: dict[str, int] = {}
    for _, _, status in in_window:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok_latencies = [end - start for start, end, status in in_window if status == 200]
    n = len(in_window)
    return {
        "window_s": w1 - w0,
        "sent": sent,
        "requests": n,
        "completed_ok": len(done_in_window),
        "images_per_s": len(done_in_window) / (w1 - w0),
        "statuses": statuses,
        "error_rate": (n - statuses.get("200", 0)) / n if n else 0.0,
        "rate_429": statuses.get("429", 0) / n if n else 0.0,
        "latencies_s": ok_latencies,
    }


def run(spec: LoadSpec) -> dict[str, Any]:
    """Run one load spec in this process (blocking)."""
    return asyncio.run(_run(spec))


class LoadProcess:
    """One long-lived child process (spawned, no torch) that runs load specs on request."""

    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))

    def run(self, spec: LoadSpec) -> dict[str, Any]:
        deadline = spec.warmup_s + spec.duration_s + spec.timeout_s + 60.0
        return self._pool.submit(run, spec).result(timeout=deadline)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LoadProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
