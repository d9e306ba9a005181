"""Memory: device bytes per resident prompt set against its tensor bytes, and how many sets fit in a budget.

ViT-B-shaped sets (depth 12, L 10, D 768, P 20, S 6, C 100) are written to a real embedded store and loaded
through ``PromptCache`` (the service's miss path). Per resident set the benchmark reports:

- tensor bytes: ``PromptSet.nbytes`` at the compute dtype plus the shared-prompt keys/values the cache keeps
  with the set (what the set must cost);
- cache accounting: ``PromptCache.resident_bytes / len(cache)``;
- storage bytes: the distinct storages the resident entry keeps alive (its tensors and one-slot bank), so a
  view that pins a larger buffer (e.g. the whole decoded file) would show;
- measured: on CUDA the ``torch.cuda.memory_allocated`` delta, on CPU the process RSS delta, per set.

Then the budget check: a cache whose budget holds ``n`` sets must keep exactly ``n`` resident once more are
loaded (LRU by bytes), and the fit table gives ``floor(budget / measured bytes per set)`` for a few budgets.
The transient bank the engine builds for a mixed batch (``service.engine.batch_bank``) is reported too.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import BenchmarkCommand, CheckFailed, SetShape, run_metadata, set_key, sync
from bench.options import ComputeOptions, option
from lpt.backbone import load_backbone
from lpt.forward import COMPUTE_DTYPES
from lpt.prompt_set import encode
from prompts_store import open_store
from service.engine import batch_bank
from service.metrics import ServiceMetrics
from service.prompt_cache import PromptCache
from service.resident import ResidentSet

TARGET_RATIO = 1.1
TENANT = "bench"
GIB = 1024**3


@dataclass
class MemoryConfig(ComputeOptions, SetShape):
    """Defaults: 32 ViT-B-shaped sets resident on the CPU in float32."""

    sets: int = option(32, help="resident sets measured (>= 2)")
    budgets_gib: tuple[float, ...] = option((1.0, 2.0, 8.0, 40.0), flag="--budgets", help="GiB, comma-separated")
    mixed_tasks: tuple[int, ...] = option((8, 64, 256), help="distinct tasks of the mixed-batch banks")

    def __post_init__(self) -> None:
        if self.sets < 2:
            raise ValueError("--sets must be >= 2")
        if min(self.mixed_tasks, default=2) < 2:
            raise ValueError("--mixed-tasks must be >= 2 each (one task stacks no bank)")


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``); 0 where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def malloc_trim() -> None:
    """Hand free heap pages back to the OS (glibc), so RSS counts live memory, not the allocator's slack."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def device_bytes(device: torch.device) -> int:
    """What this process holds: allocated CUDA memory on a GPU, RSS (after malloc_trim) on the CPU."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        return torch.cuda.memory_allocated(device)
    malloc_trim()
    return rss_bytes()


def storage_bytes(entry: ResidentSet) -> int:
    """Bytes of the distinct storages reachable from a resident entry (its set's tensors and its bank)."""
    seen: dict[int, int] = {}
    tensors = list(entry.prompt_set.tensors().values()) + [
        v for v in vars(entry.bank).values() if isinstance(v, torch.Tensor)
    ]
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def mixed_banks(
    entries: list[ResidentSet], tasks: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> list[dict[str, Any]]:
    """Bytes of the bank the engine builds for a batch with ``k`` slots (distinct tasks), for each ``k`` in ``tasks``.

    Pools and heads are indexed in place, so the bank's own bytes are the stacked tensors: shared prompts, padded
    group keys and the shared-prompt keys/values. Where ``k`` exceeds the entries they fill several slots each:
    a slot's bytes depend on the set's shape, not on which set it is, and all entries share one shape.

    Args:
        entries: resident entries of one shape.
        tasks: slot counts, each >= 2 (one set runs on its own resident bank: nothing is stacked).
        device: where the forward runs.
        dtype: the compute dtype.
    """
    banks = []
    for k in tasks:
        bank = batch_bank([entries[i % len(entries)] for i in range(k)], device, dtype)
        stacked = {name: t for name, t in vars(bank).items() if isinstance(t, torch.Tensor)}
        nbytes = sum(t.numel() * t.element_size() for t in stacked.values())
        banks.append({"tasks": k, "bank_bytes": nbytes, "per_task_bytes": nbytes / k, "tensors": sorted(stacked)})
        del bank, stacked
    return banks


def run_memory(cfg: MemoryConfig, argv: list[str], log=print) -> dict[str, Any]:
    device, dtype = torch.device(cfg.device), COMPUTE_DTYPES[cfg.dtype]
    backbone = load_backbone(cfg.shape_backbone, "random:0").to(device)  # resident sets carry keys/values for it
    info, model = backbone.info, backbone.model
    sets = [cfg.make_set(info, seed=i) for i in range(cfg.sets)]
    tasks = [f"m{i:03d}" for i in range(cfg.sets)]
    report: dict[str, Any] = {
        "benchmark": "memory",
        "config": asdict(cfg),
        "machine": run_metadata(device, ["memory", *argv]),
    }
    with tempfile.TemporaryDirectory(prefix="lpt-bench-memory-") as tmp:
        store = open_store(Path(tmp) / "store")
        keys = [set_key(store.put(TENANT, task, encode(ps))) for task, ps in zip(tasks, sets, strict=True)]
        # sets are float32; resident at the compute dtype, with their shared-prompt keys/values (2 x depth x L x D)
        kv_bytes = 2 * info.depth * cfg.prompt_length * info.embed_dim * dtype.itemsize
        tensor_bytes = sets[0].nbytes * dtype.itemsize // 4 + kv_bytes
        # Warm the load path once (allocator, imports, thread pool) so the deltas measure only resident sets.
        warm = PromptCache(store, info, device, dtype, 1 << 40, ServiceMetrics(), model=model)
        warm.acquire(keys[0]).release()
        warm.close()
        del warm

        cache = PromptCache(store, info, device, dtype, 1 << 40, ServiceMetrics(), model=model)
        before = device_bytes(device)
        entries = []
        for key in keys:
            with cache.acquire(key) as lease:  # released, but resident (the budget is huge)
                entries.append(lease.entry)
        untrimmed = rss_bytes()  # before malloc_trim: includes heap pages the load temporaries left free
        after = device_bytes(device)
        if len(cache) != cfg.sets or cache.resident_bytes != cfg.sets * tensor_bytes:
            raise CheckFailed(
                f"cache holds {len(cache)} sets / {cache.resident_bytes} bytes, expected {cfg.sets} x {tensor_bytes}"
            )
        for entry, ps in zip(entries, sets, strict=True):
            if not torch.equal(entry.prompt_set.group_prompts.cpu(), ps.group_prompts.to(dtype)):
                raise CheckFailed(f"resident {entry.key} differs from the uploaded set")
        per_set = {
            "tensor_bytes": tensor_bytes,
            "cache_accounting": cache.resident_bytes / len(cache),
            "storage_bytes": sum(storage_bytes(e) for e in entries) / len(entries),
            "measured": (after - before) / cfg.sets,
            "measured_by": "torch.cuda.memory_allocated" if device.type == "cuda" else "process RSS",
            "rss_untrimmed": (untrimmed - before) / cfg.sets,
        }
        per_set["ratios"] = {k: per_set[k] / tensor_bytes for k in ("cache_accounting", "storage_bytes", "measured")}
        log(f"  per set: {per_set}")
        report["mixed_banks"] = mixed_banks(entries, cfg.mixed_tasks, device, dtype)
        cache.close()
        del entries, cache
        gc.collect()

        # Budget: room for n sets keeps exactly n resident.
        n_fit = max(1, cfg.sets // 2)
        budget = int((n_fit + 0.5) * tensor_bytes)
        small = PromptCache(store, info, device, dtype, budget, ServiceMetrics(), model=model)
        for key in keys:
            small.acquire(key).release()
        if len(small) != n_fit:
            raise CheckFailed(f"a budget for {n_fit} sets keeps {len(small)} resident")
        budget_check = {"budget_sets": n_fit, "resident": len(small), "evictions": cfg.sets - len(small)}
        small.close()
        store.close()

    worst = max(per_set["storage_bytes"], per_set["measured"], per_set["cache_accounting"])
    report["per_set"] = per_set
    report["budget_check"] = budget_check
    report["fits"] = [
        {"budget_gib": b, "sets_by_tensor_bytes": int(b * GIB // tensor_bytes), "sets_measured": int(b * GIB // worst)}
        for b in cfg.budgets_gib
    ]
    return report


def markdown(report: dict[str, Any]) -> str:
    cfg, p = report["config"], report["per_set"]
    r = p["ratios"]

    def mark(x: float) -> str:
        return f"{x:.3f} {'ok' if x <= TARGET_RATIO else 'MISS'}"

    lines = [
        f"{cfg['shape_backbone']}-shaped sets (L {cfg['prompt_length']}, P {cfg['pool_size']}, "
        f"S {cfg['share_blocks']}, C {cfg['classes']}), {cfg['sets']} resident on {cfg['device']} ({cfg['dtype']}):",
        "",
        "| tensor bytes / set | cache accounting / set | storages kept alive / set "
        f"| measured / set ({p['measured_by']}) | worst ratio (<= {TARGET_RATIO}) |",
        "|---:|---:|---:|---:|---|",
        f"| {p['tensor_bytes']:,} | {p['cache_accounting']:,.0f} ({r['cache_accounting']:.3f}x) "
        f"| {p['storage_bytes']:,.0f} ({r['storage_bytes']:.3f}x) | {p['measured']:,.0f} ({r['measured']:.3f}x) "
        f"| {mark(max(r.values()))} |",
        "",
        f"Process RSS per set before ``malloc_trim``: {p['rss_untrimmed']:,.0f} "
        f"({p['rss_untrimmed'] / p['tensor_bytes']:.3f}x; free heap pages left by load temporaries).",
        "",
        f"Budget check: a budget for {report['budget_check']['budget_sets']} sets kept "
        f"{report['budget_check']['resident']} resident after {cfg['sets']} loads.",
        "",
        "| budget | sets that fit (tensor bytes) | sets that fit (measured) |",
        "|---:|---:|---:|",
    ]
    for f in report["fits"]:
        lines.append(f"| {f['budget_gib']:g} GiB | {f['sets_by_tensor_bytes']:,} | {f['sets_measured']:,} |")
    lines += ["", "| distinct tasks in a mixed batch | transient bank bytes | per task |", "|---:|---:|---:|"]
    for b in report["mixed_banks"]:
        lines.append(f"| {b['tasks']} | {b['bank_bytes']:,} | {b['per_task_bytes']:,.0f} |")
    return "\n".join(lines)


COMMAND = BenchmarkCommand("memory", MemoryConfig, run_memory, markdown, __doc__)
parse_args = COMMAND.parse_args
main = COMMAND.main
