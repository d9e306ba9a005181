"""The one HTTP load generator of the benchmarks, for ``/v1/classify``: closed loop (N concurrent clients) or
open loop (Poisson arrivals), one stream or several at once (tenants with their own rates). A stream may speak
the Open Inference Protocol instead (``protocol``): REST with binary tensors (tritonclient's default body) or gRPC
(``ModelInfer`` with raw contents), the same images, tasks and keys.

Runs in its own process (``LoadProcess``), so its CPU time and event loop never share an interpreter
with the server or with the engine timings of the benchmark process. Imports only the standard library
and httpx (no torch; grpc and the protocol's messages for a gRPC stream): the child starts fast and small.
Open-loop HTTP streams post through ``bench.raw_http`` (a free list of kept-alive connections), not httpx's
pool, whose cost grows with the connections a flood of 429s opens.
Every run is bounded by a request count and a wall-clock deadline. The results carry raw latencies; the
benchmarks turn them into percentiles with ``bench.common.percentile``.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import struct
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any
from urllib.parse import urlencode

import httpx

from bench.raw_http import RawHttpClient

# What a request of either HTTP client may raise short of an answer (ValueError: one the raw client cannot parse).
TRANSPORT_ERRORS = (
    httpx.HTTPError,
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    TimeoutError,
    ValueError,
)


@dataclass
class Target:
    """One (tenant, task) the generator may hit, with its API key and popularity weight."""

    task: str
    secret: str
    weight: float = 1.0


@dataclass
class LoadSpec:
    """What one load stream does (``run``), or one of several streams sharing a window (``run_together``).

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
    protocol: str = "v1"
    grpc_target: str = ""  # host:port of the gRPC server, for protocol "oip-grpc"


PROTOCOLS = ("v1", "oip-rest", "oip-grpc")
# gRPC status codes as the HTTP statuses the summaries count (the rest: 500).
GRPC_AS_HTTP = {
    "OK": 200, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}  # fmt: skip


def oip_rest_body(image: bytes) -> tuple[bytes, str]:
    """One image as tritonclient sends it by default: JSON header, then the length-prefixed BYTES element."""
    raw = struct.pack("<I", len(image)) + image
    tensor = {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return header + raw, str(len(header))


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


class _Stream:
    """One spec's requests inside a shared client and window: the records ``(start, end, status)`` it made.

    Status 0 is a transport error or timeout; -1 an open-loop arrival never sent (the in-flight cap was hit).
    """

    def __init__(
        self,
        spec: LoadSpec,
        client: httpx.AsyncClient,
        window_end: float,
        grpc_stub: Any = None,
        raw: RawHttpClient | None = None,
    ):
        if spec.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {spec.protocol!r}; choose from {', '.join(PROTOCOLS)}")
        self.spec = spec
        self.client = client
        self.grpc_stub = grpc_stub
        self.raw = raw  # open-loop HTTP streams: see bench.raw_http for why not httpx
        self.window_end = window_end
        self.rest_bodies = [oip_rest_body(i) for i in spec.images] if spec.protocol == "oip-rest" else []
        self.rng = random.Random(spec.seed)
        self.pick = _Picker(spec.targets, self.rng)
        self.records: list[tuple[float, float, int]] = []
        self.sent = 0

    def next_request(self) -> tuple[Target, int]:
        """The next request's task (drawn by popularity) and image index (cycled); counts it as sent."""
        index = self.sent % len(self.spec.images)
        self.sent += 1
        return self.pick(), index

    async def one(self, target: Target, index: int) -> None:
        start = time.perf_counter()
        if self.spec.protocol == "oip-grpc":
            status = await self._grpc(target, index)
        else:
            status = await self._http(target, index)
        self.records.append((start, time.perf_counter(), status))

    def _request(self, target: Target, index: int) -> tuple[str, bytes, dict[str, str]]:
        """(path with query, body, headers) of one HTTP request of this stream's protocol."""
        auth = {"Authorization": f"Bearer {target.secret}"}
        if self.spec.protocol == "oip-rest":
            body, header_length = self.rest_bodies[index]
            return f"/v2/models/{target.task}/infer", body, {**auth, "Inference-Header-Content-Length": header_length}
        query = urlencode({"task": target.task, "top_k": self.spec.top_k})
        return f"/v1/classify?{query}", self.spec.images[index], {**auth, "Content-Type": "image/jpeg"}

    async def _http(self, target: Target, index: int) -> int:
        """The status of one HTTP request (0: a transport error or timeout), through the raw client on an
        open-loop stream and httpx otherwise."""
        path, body, headers = self._request(target, index)
        timeout = self.spec.timeout_s
        try:
            if self.raw is not None:
                return await asyncio.wait_for(self.raw.post(path, body, headers), timeout)
            return (await self.client.post(path, content=body, headers=headers, timeout=timeout)).status_code
        except TRANSPORT_ERRORS:
            return 0

    async def _grpc(self, target: Target, index: int) -> int:
        import grpc

        from service.oip import proto as pb

        request = pb.ModelInferRequest(model_name=target.task)
        request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
        image = self.spec.images[index]
        request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
        metadata = (("authorization", f"Bearer {target.secret}"),)
        try:
            await self.grpc_stub.ModelInfer(request, metadata=metadata, timeout=self.spec.timeout_s)
            return 200
        except grpc.aio.AioRpcError as exc:
            return GRPC_AS_HTTP.get(exc.code().name, 500)

    async def closed_client(self) -> None:
        while time.perf_counter() < self.window_end and self.sent < self.spec.max_requests:
            await self.one(*self.next_request())

    async def open_loop(self) -> None:
        spec = self.spec
        in_flight: set[asyncio.Task] = set()
        next_at = time.perf_counter()
        while next_at < self.window_end and self.sent < spec.max_requests:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= spec.concurrency:
                self.records.append((next_at, next_at, -1))
            else:
                task = asyncio.ensure_future(self.one(*self.next_request()))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            next_at += self.rng.expovariate(spec.rate)
        if in_flight:  # bounded: what has not answered by then is cancelled and not recorded
            _, late = await asyncio.wait(in_flight, timeout=spec.timeout_s)
            for task in late:
                task.cancel()

    async def drive(self) -> None:
        if self.spec.mode == "closed":
            await asyncio.gather(*(self.closed_client() for _ in range(self.spec.concurrency)))
        elif self.spec.mode == "open":
            await self.open_loop()
        else:
            raise ValueError(f"unknown mode {self.spec.mode!r}")


async def _run(specs: list[LoadSpec]) -> list[dict[str, Any]]:
    first = specs[0]
    if any((s.url, s.warmup_s, s.duration_s) != (first.url, first.warmup_s, first.duration_s) for s in specs):
        raise ValueError("streams run together share the server, the warm-up and the measured window")
    t0 = time.perf_counter()
    window_start = t0 + first.warmup_s
    window_end = window_start + first.duration_s
    connections = sum(s.concurrency for s in specs)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=first.url, limits=limits) as client:
        channels = {s.grpc_target: _grpc_stub(s.grpc_target) for s in specs if s.protocol == "oip-grpc"}
        try:
            streams = [
                _Stream(
                    spec,
                    client,
                    window_end,
                    channels.get(spec.grpc_target, (None, None))[1],
                    RawHttpClient(spec.url) if spec.mode == "open" and spec.protocol != "oip-grpc" else None,
                )
                for spec in specs
            ]
            await asyncio.gather(*(stream.drive() for stream in streams))
            for stream in streams:
                if stream.raw is not None:
                    await stream.raw.close()
        finally:
            for channel, _ in channels.values():
                await channel.close()
    return [_summarise(s.records, window_start, window_end, s.sent) for s in streams]


def _grpc_stub(target: str) -> tuple[Any, Any]:
    """One channel per gRPC server for every stream of a run (as the HTTP streams share one client)."""
    import grpc

    from service.oip import proto as pb

    options = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    channel = grpc.aio.insecure_channel(target, options=options)
    return channel, pb.client(channel)


def _summarise(records: list[tuple[float, float, int]], w0: float, w1: float, sent: int) -> dict[str, Any]:
    """Throughput counts completions inside the window; latencies are of requests started inside it.

    ``latencies_s`` are the 200 answers', ``rejected_latencies_s`` the 429 answers' (seconds, unsorted).
    """
    in_window = [r for r in records if w0 <= r[0] < w1]
    done_in_window = [r for r in records if w0 <= r[1] < w1 and r[2] == 200]
    statuses: dict[str, int] = {}
    for _, _, status in in_window:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
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
        "latencies_s": [end - start for start, end, status in in_window if status == 200],
        "rejected_latencies_s": [end - start for start, end, status in in_window if status == 429],
    }


def run(spec: LoadSpec) -> dict[str, Any]:
    """Run one load spec in this process (blocking)."""
    return asyncio.run(_run([spec]))[0]


def run_together(specs: list[LoadSpec]) -> list[dict[str, Any]]:
    """Run several streams at once against one server, over one window; one summary per spec, in order."""
    return asyncio.run(_run(specs))


class LoadProcess:
    """One long-lived child process (spawned, no torch) that runs load specs on request."""

    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))

    def run(self, spec: LoadSpec) -> dict[str, Any]:
        """``run(spec)`` in the child."""
        return self.run_together([spec])[0]

    def run_together(self, specs: list[LoadSpec]) -> list[dict[str, Any]]:
        """``run_together(specs)`` in the child."""
        deadline = specs[0].warmup_s + specs[0].duration_s + max(s.timeout_s for s in specs) + 60.0
        return self._pool.submit(run_together, specs).result(timeout=deadline)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LoadProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
