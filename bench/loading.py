"""Prompt loading: cache-miss loads from Redis and the embedded store, and upload-to-first-served over HTTP.

Part 1 (``PromptCache`` directly, real stores, no fakes): ViT-B-shaped sets (depth 12, L 10, D 768, P 20,
S 6, C 100: about 4.4 MB) are written to a fresh ``redis-server`` (AOF, appendfsync always) and to the embedded
SQLite store. Each timed load drops the task from the cache, then ``PromptCache.acquire`` runs the service's
miss path: loader thread, store read (checksum verified), decode + validation, copy to the device, insert.
Stores alternate load by load. The parts (store read, decode + validate, device copy) are timed separately,
also alternating. Before timing, every loaded set must equal the uploaded one.

Part 2 (a real ``lpt-serve`` per store): ``POST /v1/prompts`` of a new version, then the first
``/v1/classify`` of it (upload-to-first-served); a second classify (steady state, resident); and a task
written to the store behind the server's back, whose first classify is a cache miss through HTTP.
Responses must carry the new version and the engine's scores.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import (
    BenchmarkCommand,
    CheckFailed,
    SetShape,
    cifar_jpegs,
    default_weights,
    latency_summary,
    make_set,
    on_engine_thread,
    resident,
    run_metadata,
    set_key,
    sync,
)
from bench.options import ComputeOptions, ProcessThreads, option
from bench.redis_server import BenchRedis
from bench.server import LptServe, ServeOptions
from lpt.backbone import BackboneInfo, load_backbone
from lpt.forward import COMPUTE_DTYPES
from lpt.prompt_set import PromptSet, encode, load_and_validate
from prompts_store import open_store
from prompts_store.base import PromptStore
from service.engine import Engine
from service.images import ImageDecoder
from service.metrics import ServiceMetrics
from service.prompt_cache import PromptCache
from service.resident import to_device

TARGET_REDIS_P99_MS = 20.0
TENANT = "bench"
STORES = ("redis", "embedded")


@dataclass
class LoadingConfig(ProcessThreads, ComputeOptions, SetShape):
    """Defaults: ViT-B-shaped sets (about 4.4 MB) on the CPU; part 2 serves DeiT-Tiny."""

    sets: int = option(16, help="distinct sets in each store")
    loads: int = option(200, help="timed cache-miss loads per store")
    stores: tuple[str, ...] = option(STORES, help="redis, embedded or both")
    http: bool = option(True, help="the upload-to-first-served part (--no-http: skip it)")
    serve_backbone: str = option("deit_tiny_patch16_224", help="backbone of the lpt-serve for part 2")
    serve_weights: str | None = option(None, help="hub | PATH | random:SEED (default: shared DeiT-Tiny if present)")
    serve_img_size: int | None = option(None)
    serve_classes: int = option(100)
    uploads: int = option(20, help="timed upload-to-first-served rounds per store")

    def __post_init__(self) -> None:
        unknown = set(self.stores) - set(STORES)
        if unknown:
            raise ValueError(f"unknown stores {sorted(unknown)}; choose from {', '.join(STORES)}")


class Stores:
    """Fresh real stores: a private redis-server (own port and dir) and an embedded store in a temp dir."""

    def __init__(self, kinds: tuple[str, ...]):
        self.kinds = kinds
        self._tmp = tempfile.TemporaryDirectory(prefix="lpt-bench-loading-")
        self.redis: BenchRedis | None = None
        self.specs: dict[str, str] = {}

    def __enter__(self) -> Stores:
        if "redis" in self.kinds:
            self.redis = BenchRedis(Path(self._tmp.name) / "redis").start()
            self.specs["redis"] = self.redis.url
        if "embedded" in self.kinds:
            self.specs["embedded"] = str(Path(self._tmp.name) / "embedded")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.redis is not None:
            self.redis.stop()
        self._tmp.cleanup()


def same_set(got: PromptSet, want: PromptSet, dtype: torch.dtype) -> bool:
    """Tensors equal (after the cache's dtype cast) and metadata equal."""
    pairs = got.tensors(), want.tensors()
    if pairs[0].keys() != pairs[1].keys():
        return False
    for name, tensor in pairs[1].items():
        if not torch.equal(pairs[0][name].cpu(), tensor.to(dtype)):
            return False
    return (got.class_names, got.share_blocks, got.top_k, got.head_scale) == (
        want.class_names,
        want.share_blocks,
        want.top_k,
        want.head_scale,
    )


def cache_miss_loads(cfg: LoadingConfig, info: BackboneInfo, stores: Stores, log=print) -> dict[str, Any]:
    device, dtype = torch.device(cfg.device), COMPUTE_DTYPES[cfg.dtype]
    sets = [cfg.make_set(info, seed=i) for i in range(cfg.sets)]
    blobs = [encode(ps) for ps in sets]
    tasks = [f"set{i:03d}" for i in range(cfg.sets)]
    opened: dict[str, PromptStore] = {k: open_store(spec, timeout_s=5.0) for k, spec in stores.specs.items()}
    caches = {k: PromptCache(s, info, device, dtype, 1 << 40, ServiceMetrics()) for k, s in opened.items()}
    try:
        meta = {"num_classes": str(cfg.classes)}
        keys = {
            kind: [set_key(store.put(TENANT, task, blob, meta)) for task, blob in zip(tasks, blobs, strict=True)]
            for kind, store in opened.items()
        }
        for kind, cache in caches.items():  # correctness before timing
            for key, ps in zip(keys[kind], sets, strict=True):
                task = key.task
                with cache.acquire(key) as lease:
                    entry = lease.entry
                    if not same_set(entry.prompt_set, ps, dtype):
                        raise CheckFailed(f"{kind}: the loaded {task} differs from the uploaded set")
                    if entry.prompt_set.shared_prompt.device.type != device.type:
                        raise CheckFailed(f"{kind}: {task} is resident on {entry.prompt_set.shared_prompt.device}")
            for task in tasks:
                cache.discard_task(TENANT, task)
        kinds = list(caches)
        totals: dict[str, list[float]] = {k: [] for k in kinds}
        parts: dict[str, dict[str, list[float]]] = {k: {"read": [], "validate": [], "to_device": []} for k in kinds}
        for i in range(cfg.loads):
            for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
                cache, key = caches[kind], keys[kind][i % len(tasks)]
                cache.discard_task(TENANT, key.task)
                if len(cache) != 0:
                    raise CheckFailed(f"{kind}: {len(cache)} sets resident after a drop (the load is not a miss)")
                start = time.perf_counter()
                lease = cache.acquire(key)
                sync(device)
                totals[kind].append(time.perf_counter() - start)
                lease.release()
                cache.discard_task(TENANT, key.task)
        for i in range(max(20, cfg.loads // 4)):
            task = tasks[i % len(tasks)]
            for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
                t0 = time.perf_counter()
                blob = opened[kind].get(TENANT, task)
                t1 = time.perf_counter()
                ps = load_and_validate(blob.data, info)
                t2 = time.perf_counter()
                to_device(ps, device, dtype)
                sync(device)
                t3 = time.perf_counter()
                for name, dt in (("read", t1 - t0), ("validate", t2 - t1), ("to_device", t3 - t2)):
                    parts[kind][name].append(dt)
        out = {}
        for kind in kinds:
            out[kind] = {
                "total": latency_summary(totals[kind]),
                "parts_median_ms": {name: 1e3 * statistics.median(v) for name, v in parts[kind].items()},
                "set_bytes": len(blobs[0]),
                "resident_bytes": sets[0].nbytes * dtype.itemsize // 4,
            }
            total = out[kind]["total"]
            log(f"  miss load {kind}: p50 {total['p50_ms']:.1f} ms, p99 {total['p99_ms']:.1f} ms")
        return out
    finally:
        for cache in caches.values():
            cache.close()
        for store in opened.values():
            store.close()


def _infer(engine: Engine, images: torch.Tensor, entries: list) -> list[torch.Tensor]:
    with torch.inference_mode():
        return engine.infer(images, entries)


def upload_to_served(cfg: LoadingConfig, stores: Stores, log=print) -> dict[str, Any]:
    """Per store: a server on it; upload -> first classify; steady classify; cold task written to the store."""
    device = torch.device(cfg.device)
    weights = cfg.serve_weights or default_weights(cfg.serve_backbone)
    backbone = load_backbone(cfg.serve_backbone, weights, cfg.serve_img_size).to(device)
    engine = Engine(backbone, device, COMPUTE_DTYPES[cfg.dtype])
    image = cifar_jpegs(1)[0]
    tensor = ImageDecoder(backbone.eval_transform, 10 * 1024 * 1024, 40_000_000)(image)
    keys = {TENANT: "bench-loading-secret-0"}
    out: dict[str, Any] = {}
    for kind, spec in stores.specs.items():
        if kind == "embedded":
            spec = spec + "-serve"
        opts = ServeOptions(
            backbone=cfg.serve_backbone,
            weights=weights,
            img_size=cfg.serve_img_size,
            device=cfg.device,
            dtype=cfg.dtype,
            store=spec,
        )
        times: dict[str, list[float]] = {"upload": [], "first_classify": [], "upload_to_served": [], "steady": []}
        times["cold_first"] = []
        with LptServe(opts, keys) as serve, httpx.Client(base_url=serve.url, timeout=120.0) as client:
            store = open_store(spec, timeout_s=5.0)
            headers = {**serve.headers(TENANT), "Content-Type": "image/jpeg"}

            def classify(task: str, client: httpx.Client = client, headers: dict = headers) -> dict:
                resp = client.post("/v1/classify", params={"task": task, "top_k": 1000}, content=image, headers=headers)
                if resp.status_code != 200:
                    raise CheckFailed(f"classify {task}: {resp.status_code} {resp.text}")
                return resp.json()

            def check(answer: dict, ps: PromptSet, version: int, what: str, kind: str = kind) -> None:
                if answer["version"] != version:
                    raise CheckFailed(f"{kind} {what}: served version {answer['version']}, expected {version}")
                entry = resident(TENANT, "x", version, ps, device, engine.dtype)
                want = on_engine_thread(_infer, engine, tensor[None], [entry])[0]
                got = torch.zeros(ps.num_classes)
                for p in answer["predictions"]:
                    got[p["index"]] = p["score"]
                if not float((got - want.float()).abs().max()) <= cfg.probability_atol():
                    raise CheckFailed(f"{kind} {what}: scores differ from the engine's for the uploaded set")

            for u in range(cfg.uploads + 1):  # the first round warms the connection and code paths, unmeasured
                ps = make_set(backbone.info, cfg.serve_classes, seed=50_000 + u)
                t0 = time.perf_counter()
                resp = client.post("/v1/prompts", params={"task": "fresh"}, content=encode(ps), headers=headers)
                t1 = time.perf_counter()
                if resp.status_code != 201:
                    raise CheckFailed(f"{kind}: upload answered {resp.status_code} {resp.text}")
                version = resp.json()["version"]
                first = classify("fresh")
                t2 = time.perf_counter()
                classify("fresh")
                t3 = time.perf_counter()
                cold = make_set(backbone.info, cfg.serve_classes, seed=90_000 + u)
                stored = store.put(TENANT, f"cold{u:03d}", encode(cold), {"num_classes": str(cfg.serve_classes)})
                t4 = time.perf_counter()
                cold_answer = classify(f"cold{u:03d}")
                t5 = time.perf_counter()
                if u % 5 == 0:
                    check(first, ps, version, f"upload {u}")
                    check(cold_answer, cold, stored.version, f"cold task {u}")
                if u == 0:
                    continue
                for name, dt in (
                    ("upload", t1 - t0),
                    ("first_classify", t2 - t1),
                    ("upload_to_served", t2 - t0),
                    ("steady", t3 - t2),
                    ("cold_first", t5 - t4),
                ):
                    times[name].append(dt)
            store.close()
        out[kind] = {name: latency_summary(v) for name, v in times.items()}
        out[kind]["set_bytes"] = len(encode(ps))
        log(f"  upload-to-served {kind}: p50 {out[kind]['upload_to_served']['p50_ms']:.1f} ms")
    return out


def run_loading(cfg: LoadingConfig, argv: list[str], log=print) -> dict[str, Any]:
    cfg.set_threads()
    device = torch.device(cfg.device)
    info = load_backbone(cfg.shape_backbone, "random:0").info  # only the shape and fingerprint are used
    report: dict[str, Any] = {
        "benchmark": "loading",
        "config": asdict(cfg),
        "machine": run_metadata(device, ["loading", *argv]),
    }
    with Stores(cfg.stores) as stores:
        report["cache_miss"] = cache_miss_loads(cfg, info, stores, log)
        if cfg.http:
            report["http"] = upload_to_served(cfg, stores, log)
    return report


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"Cache-miss loads of {cfg['shape_backbone']}-shaped sets (L {cfg['prompt_length']}, P {cfg['pool_size']}, "
        f"S {cfg['share_blocks']}, C {cfg['classes']}) to {cfg['device']} ({cfg['dtype']}):",
        "",
        "| store | set bytes | loads | p50 ms | p99 ms | max ms | read ms (p50) | decode + validate ms (p50) "
        "| to device ms (p50) | p99 target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for kind, r in report["cache_miss"].items():
        t, p = r["total"], r["parts_median_ms"]
        target = (
            f"{'ok' if t['p99_ms'] <= TARGET_REDIS_P99_MS else 'MISS'} (<= {TARGET_REDIS_P99_MS:.0f})"
            if kind == "redis"
            else "-"
        )
        lines.append(
            f"| {kind} | {r['set_bytes']:,} | {t['count']} | {t['p50_ms']:.1f} | {t['p99_ms']:.1f} | {t['max_ms']:.1f} "
            f"| {p['read']:.1f} | {p['validate']:.1f} | {p['to_device']:.2f} | {target} |"
        )
    if "http" in report:
        lines += [
            "",
            f"Through HTTP ({cfg['serve_backbone']} server, sets with C {cfg['serve_classes']}), p50 / p99 ms:",
            "",
            "| store | set bytes | upload | first classify | upload to first served | steady classify "
            "| cold task, first classify |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for kind, r in report["http"].items():

            def cell(name: str, r: dict = r) -> str:
                return f"{r[name]['p50_ms']:.0f} / {r[name]['p99_ms']:.0f}"

            lines.append(
                f"| {kind} | {r['set_bytes']:,} | {cell('upload')} | {cell('first_classify')} "
                f"| {cell('upload_to_served')} | {cell('steady')} | {cell('cold_first')} |"
            )
    return "\n".join(lines)


COMMAND = BenchmarkCommand("loading", LoadingConfig, run_loading, markdown, __doc__)
parse_args = COMMAND.parse_args
main = COMMAND.main
