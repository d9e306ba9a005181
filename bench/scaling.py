"""Scaling: engine throughput against distinct tasks per batch and against registered (resident) tasks.

Each timed step is the service's work for one batch without HTTP: a ``PromptCache.acquire`` (hit) per row,
``Engine.infer`` (bank for mixed batches, forward, probabilities to the CPU), a ``release`` per row.

- Part A: batches of ``--batch`` rows from 1, 8, 64, 256 distinct tasks (``--tasks-per-batch``) out of
  ``--tasks`` registered, all sets of one shape (so every row does the same work); ratio to 1 task.
- Part B: ``--registered-batch`` rows from ``--registered-tasks-per-batch`` distinct tasks drawn uniformly
  from 10 ... 10,000 resident tasks (``--registered``); ratio to the smallest registry. The sets are small
  DeiT-Tiny-shaped ones (pool ``--registered-pool``) so 10,000 stay bounded in memory; on the CPU the caches
  of different sizes share the first N sets' tensors (``to_device`` is a no-op there).

Variants are timed round robin inside each repeat (rotating the start); ratios are medians of per-repeat
ratios. Before timing, every variant's rows (up to ``--check-tasks`` tasks per variant) must equal each
task run alone.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    BenchmarkCommand,
    CheckFailed,
    default_weights,
    make_set,
    on_engine_thread,
    run_metadata,
    set_key,
    sync,
)
from bench.options import BackboneOptions, ComputeOptions, ProbabilityCheck, ProcessThreads, option
from lpt.backbone import Backbone, load_backbone
from lpt.forward import COMPUTE_DTYPES
from lpt.prompt_set import PromptSet
from prompts_store import open_store
from prompts_store.base import StoredVersion
from service.engine import Engine, batch_bank
from service.metrics import ServiceMetrics
from service.prompt_cache import PromptCache
from service.resident import Lease

TENANT = "bench"
PARTS = ("tasks_per_batch", "registered")


@dataclass
class ScalingConfig(ProbabilityCheck, ProcessThreads, ComputeOptions, BackboneOptions):
    """Defaults: DeiT-Tiny on the CPU; part A batches of 256, part B up to 10,000 registered tasks."""

    img_size: int | None = option(None)
    batch: int = option(256, help="rows per batch in part A")
    tasks_per_batch: tuple[int, ...] = option((1, 8, 64, 256), help="distinct tasks per batch in part A")
    tasks: int = option(1000, help="registered tasks in part A")
    classes: int = option(10)
    pool_size: int = option(20, help="pool of part A's sets")
    registered: tuple[int, ...] = option((10, 100, 1000, 10000), help="registry sizes of part B")
    registered_batch: int = option(64, help="rows per batch in part B")
    registered_tasks_per_batch: int = option(8, help="distinct tasks per batch in part B")
    registered_pool: int = option(4, help="pool of part B's sets")
    repeats: int = option(5)
    warmup: int = option(1)
    check_tasks: int = option(16, help="tasks checked against a solo run")
    seed: int = option(0)
    parts: tuple[str, ...] = option(PARTS, help="tasks_per_batch, registered or both")

    def __post_init__(self) -> None:
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
        if self.tasks < max(self.tasks_per_batch):
            raise ValueError("--tasks must be >= the largest --tasks-per-batch")


Rows = list[tuple[str, str]]  # (tenant, task) per row


def installed(tenant: str, task: str) -> StoredVersion:
    """The version ``build_cache`` installs for a task (version 1; never read from the store)."""
    return StoredVersion(tenant, task, 1, "", 0, 0.0)


def build_cache(store, backbone: Backbone, sets: list[PromptSet], device, dtype) -> PromptCache:
    """A cache with every set resident, as after uploads (the store is not read on hits)."""
    cache = PromptCache(store, backbone.info, device, dtype, 1 << 50, ServiceMetrics(), model=backbone.model)
    for i, ps in enumerate(sets):
        cache.install(installed(TENANT, f"t{i:05d}"), cache.prepare(ps))
    return cache


def lease_rows(cache: PromptCache, rows: Rows) -> list[Lease]:
    """One lease per row (a hit: every set is resident)."""
    return [cache.acquire(set_key(installed(tenant, task))) for tenant, task in rows]


def draw_rows(batch: int, registered: int, distinct: int, gen: torch.Generator) -> Rows:
    """``batch`` rows over ``min(distinct, batch, registered)`` distinct tasks, each with at least one row."""
    k = min(distinct, batch, registered)
    ids = torch.randperm(registered, generator=gen)[:k].tolist()
    slots = (torch.arange(batch) % k)[torch.randperm(batch, generator=gen)].tolist()
    return [(TENANT, f"t{ids[s]:05d}") for s in slots]


def service_step(cache: PromptCache, engine: Engine, images: torch.Tensor, rows: Rows) -> list[torch.Tensor]:
    """One batch as the service runs it: lease every row's set, infer, release."""
    leases = lease_rows(cache, rows)
    try:
        return engine.infer(images, [lease.entry for lease in leases])
    finally:
        for lease in leases:
            lease.release()


def check_rows(
    cache: PromptCache, engine: Engine, images: torch.Tensor, rows: Rows, max_tasks: int, atol: float
) -> float:
    """Mixed rows must equal their task run alone (for up to ``max_tasks`` tasks); returns the worst diff."""
    with torch.inference_mode():
        mixed = service_step(cache, engine, images, rows)
        worst = 0.0
        for task in list(dict.fromkeys(k for _, k in rows))[:max_tasks]:
            idx = [i for i, (_, k) in enumerate(rows) if k == task]
            alone = service_step(cache, engine, images[idx], [rows[i] for i in idx])
            for i, probs in zip(idx, alone, strict=True):
                diff = float((mixed[i] - probs).abs().max())
                if not (mixed[i].shape == probs.shape and diff <= atol):
                    raise CheckFailed(f"task {task} row {i}: mixed batch differs from the task alone by {diff}")
                worst = max(worst, diff)
    return worst


def time_variants(
    steps: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    names = list(steps)
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                steps[name]()
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                steps[name]()
                sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def summarise(batch: int, times: dict[str, list[float]], baseline: str) -> dict[str, Any]:
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_ms": med * 1e3,
            "images_per_s": batch / med,
            "vs_baseline": statistics.median(b / t for t, b in zip(ts, times[baseline], strict=True)),
            "times_s": ts,
        }
    return out


def bank_build_ms(cache: PromptCache, rows: Rows, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Median time of ``batch_bank`` for one batch's distinct sets, as every ``Engine.infer`` builds it (one set
    uses its resident bank, so a single-task batch costs next to nothing)."""
    leases = lease_rows(cache, list(dict.fromkeys(rows)))
    entries = [lease.entry for lease in leases]
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            batch_bank(entries, device, dtype)
            sync(device)
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)
    finally:
        for lease in leases:
            lease.release()


def run_scaling(cfg: ScalingConfig, argv: list[str], log=print) -> dict[str, Any]:
    cfg.set_threads()
    device, dtype = torch.device(cfg.device), COMPUTE_DTYPES[cfg.dtype]
    backbone = load_backbone(cfg.backbone, cfg.weights or default_weights(cfg.backbone), cfg.img_size).to(device)
    engine = Engine(backbone, device, dtype)
    atol = cfg.probability_atol(cfg.atol)
    gen = torch.Generator().manual_seed(cfg.seed)
    report: dict[str, Any] = {
        "benchmark": "scaling",
        "config": {**asdict(cfg), "weights": backbone.info.weights},
        "machine": run_metadata(device, ["scaling", *argv]),
    }
    log(
        f"scaling: {cfg.backbone} ({backbone.info.weights}) on {device} ({cfg.dtype}), "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory(prefix="lpt-bench-scaling-") as tmp:
        store = open_store(Path(tmp) / "store")
        if "tasks_per_batch" in cfg.parts:
            sets = [make_set(backbone.info, cfg.classes, pool_size=cfg.pool_size, seed=i) for i in range(cfg.tasks)]
            cache = build_cache(store, backbone, sets, device, dtype)
            del sets
            images = torch.randn(cfg.batch, *backbone.info.input_size, generator=gen).to(device)
            draws = {k: draw_rows(cfg.batch, cfg.tasks, k, gen) for k in cfg.tasks_per_batch}
            checks = {
                k: on_engine_thread(check_rows, cache, engine, images, r, cfg.check_tasks, atol)
                for k, r in draws.items()
            }
            log(f"  part A checks passed: {checks}")
            steps = {
                f"{k} tasks": (lambda rows=rows: service_step(cache, engine, images, rows)) for k, rows in draws.items()
            }
            times = on_engine_thread(time_variants, steps, cfg.repeats, cfg.warmup, device)
            rows_out = summarise(cfg.batch, times, next(iter(steps)))
            for rows, name in zip(draws.values(), steps, strict=True):
                rows_out[name]["distinct_tasks"] = len({r[1] for r in rows})
                rows_out[name]["bank_ms"] = on_engine_thread(bank_build_ms, cache, rows, device, dtype, cfg.repeats)
            report["tasks_per_batch"] = {
                "batch": cfg.batch,
                "registered": cfg.tasks,
                "checks": checks,
                "rows": rows_out,
            }
            log("  part A: " + ", ".join(f"{n} {v['images_per_s']:.1f}/s" for n, v in rows_out.items()))
            cache.close()
            del cache, images
        if "registered" in cfg.parts:
            biggest = max(cfg.registered)
            sets = [
                make_set(backbone.info, cfg.classes, pool_size=cfg.registered_pool, top_k=2, seed=100_000 + i)
                for i in range(biggest)
            ]
            caches = {n: build_cache(store, backbone, sets[:n], device, dtype) for n in cfg.registered}
            del sets
            images = torch.randn(cfg.registered_batch, *backbone.info.input_size, generator=gen).to(device)
            steps, checks, draws_b = {}, {}, {}
            for n, cache in caches.items():
                # A fresh draw per repeat would change the work; one fixed draw per registry size keeps it equal.
                rows = draw_rows(cfg.registered_batch, n, cfg.registered_tasks_per_batch, gen)
                draws_b[n] = rows
                checks[n] = on_engine_thread(check_rows, cache, engine, images, rows, cfg.check_tasks, atol)
                steps[f"{n} registered"] = lambda cache=cache, rows=rows: service_step(cache, engine, images, rows)
            log(f"  part B checks passed: {checks}")
            times = on_engine_thread(time_variants, steps, cfg.repeats, cfg.warmup, device)
            rows_out = summarise(cfg.registered_batch, times, next(iter(steps)))
            for (n, cache), name in zip(caches.items(), steps, strict=True):
                rows_out[name]["resident"] = len(cache)
                rows_out[name]["distinct_tasks"] = len({r[1] for r in draws_b[n]})
            report["registered"] = {
                "batch": cfg.registered_batch,
                "tasks_per_batch": cfg.registered_tasks_per_batch,
                "pool_size": cfg.registered_pool,
                "checks": checks,
                "rows": rows_out,
            }
            log("  part B: " + ", ".join(f"{n} {v['images_per_s']:.1f}/s" for n, v in rows_out.items()))
            for cache in caches.values():
                cache.close()
        store.close()
    return report


def markdown(report: dict[str, Any]) -> str:
    lines: list[str] = []
    if "tasks_per_batch" in report:
        a = report["tasks_per_batch"]
        lines += [
            f"Batch {a['batch']}, {a['registered']} tasks registered:",
            "",
            "| distinct tasks per batch | median ms | images/s | x 1 task | bank build ms |",
            "|---:|---:|---:|---:|---:|",
        ]
        for v in a["rows"].values():
            lines.append(
                f"| {v['distinct_tasks']} | {v['median_ms']:.0f} | {v['images_per_s']:.1f} | {v['vs_baseline']:.3f} "
                f"| {v['bank_ms']:.1f} |"
            )
    if "registered" in report:
        b = report["registered"]
        lines += [
            "",
            f"Batch {b['batch']}, {b['tasks_per_batch']} distinct tasks per batch drawn uniformly, "
            f"pool {b['pool_size']}:",
            "",
            "| registered (resident) tasks | median ms | images/s | x smallest |",
            "|---:|---:|---:|---:|",
        ]
        for v in b["rows"].values():
            lines.append(
                f"| {v['resident']:,} | {v['median_ms']:.0f} | {v['images_per_s']:.1f} | {v['vs_baseline']:.3f} |"
            )
    return "\n".join(lines).lstrip("\n")


COMMAND = BenchmarkCommand("scaling", ScalingConfig, run_scaling, markdown, __doc__)
parse_args = COMMAND.parse_args
main = COMMAND.main
