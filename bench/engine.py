"""Engine benchmark: throughput of the prompted forward against what a user would otherwise run.

Variants, all on the same images, the same backbone and the same device, in one process:

- ``plain``: timm's own forward of the backbone (``forward_features`` + pooling), no prompts: the one-pass limit;
- ``two_pass``: the published LPT inference (query pass + full final pass), one task per batch
  (``lpt.reference.two_pass_batched``);
- ``append_single``: ``lpt.forward.prompted_forward`` with the prompt tokens appended in every block (the
  layout before prompts entered attention as keys/values only), one task per batch;
- ``ours_single``: ``prompted_forward`` (prompts as keys/values, shared keys/values precomputed per set as the
  service keeps them resident), one task per batch;
- ``ours_mixed``: ``prompted_forward`` on batches whose rows come from up to ``--tasks-per-batch`` distinct
  tasks drawn from ``--tasks`` registered ones; the bank is stacked from the batch's sets on every call,
  as the service does, and that time counts;
- ``per_task``: the same mixed batches, but every task's rows run as their own forward (what a
  model-multiplexing server does);
- ``vpt_single``: ``prompted_forward`` for the single task's set without its pool (deep VPT: one pass);
- ``plain_last_token``: the plain forward with the last block computed for the pooled class token alone, as
  ``prompted_forward`` does it (the like-for-like limit: the saving is not the prompts').

Before anything is timed, every batch size is checked: the mixed-task rows must equal each task run
alone, and ours must equal the published two-pass algorithm; the run fails loudly otherwise. Variants
are timed round-robin inside each repeat (rotating the start), and ratios are medians of per-repeat
ratios, so slow phases of a shared, noisy machine hit all variants alike.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench.common import BenchmarkCommand, CheckFailed, default_weights, run_metadata
from bench.engine_report import markdown, summarise
from bench.options import BackboneOptions, ComputeOptions, ProcessThreads, option
from lpt.backbone import Backbone, load_backbone
from lpt.forward import (
    COMPUTE_DTYPES,
    PromptBank,
    SharedKV,
    autocast,
    embed,
    pool_features,
    pooled_tokens,
    precompute_shared_kv,
    prompted_forward,
)
from lpt.host_memory import RETAIN_BYTES, retain_freed_memory
from lpt.init import init_prompt_set
from lpt.prompt_kv import kv_prompted_block, uses_prompt_kv
from lpt.prompt_set import PromptSet
from lpt.reference import two_pass_batched

# ``cpu`` counts only the CPU time this process used, so time spent descheduled by other processes on a shared
# machine is left out. Use it with --threads 1 on CPU: with more threads, OpenMP spin-waits for a descheduled
# sibling are counted as CPU time. Images/s are then per core; the ratios stay comparable.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

KVs = dict[int, SharedKV]  # id(prompt set) -> its precomputed shared keys/values
FLOAT32_LOGIT_ATOL = 1e-4
AUTOCAST_LOGIT_ATOL = 0.5  # bf16/fp16: a logit's rounding depends on the batch and kernels it runs with


@dataclass
class EngineConfig(ProcessThreads, ComputeOptions, BackboneOptions):
    """What to run. Defaults: the CPU setting (DeiT-Tiny, 224 px, float32)."""

    img_size: int | None = option(None, help="build the backbone for this input size")
    batch_sizes: tuple[int, ...] = option((1, 8, 32, 64), help="batch sizes to time")
    repeats: int = option(15, help="timed rounds per batch size (median reported)")
    warmup: int = option(1, help="untimed rounds per batch size")
    tasks: int = option(1000, help="registered tasks the mixed batches draw from")
    tasks_per_batch: int = option(64, help="distinct tasks per mixed batch")
    seed: int = option(0)
    prompt_length: int = option(10, help="L, prompt tokens per block")
    pool_size: int = option(20, help="P, group prompts of the single-task set (registered sets: P/2 to P)")
    share_blocks: int = option(6, help="S, blocks with the shared prompt only")
    top_k: int = option(2, help="k, group prompts averaged per image")
    atol: float | None = option(
        None,
        help=f"logit tolerance of the correctness check (default: {FLOAT32_LOGIT_ATOL:g} in float32,"
        f" {AUTOCAST_LOGIT_ATOL:g} under autocast)",
    )
    clock: str = option("wall", choices=sorted(CLOCKS), help="wall clock, or cpu: this process's CPU time")
    host_memory_retain: int = option(
        RETAIN_BYTES,
        flag="--host-memory-retain-bytes",
        help="freed host memory the allocator keeps, as lpt-serve sets it (0: glibc's defaults)",
    )

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.repeats, self.tasks, self.tasks_per_batch, *self.batch_sizes) < 1:
            raise ValueError("--repeats, --tasks, --tasks-per-batch and every batch size must be >= 1")


@dataclass
class MixedDraw:
    """One mixed-task batch: which registered tasks it holds and which of them each row belongs to.

    Attributes:
        task_ids: distinct registry indices, in bank slot order.
        slots: ``[B]`` bank slot per row.
    """

    task_ids: list[int]
    slots: torch.Tensor

    def groups(self) -> list[tuple[int, torch.Tensor]]:
        """(registry index, row indices) for every task in the batch."""
        return [(tid, (self.slots == s).nonzero().squeeze(1)) for s, tid in enumerate(self.task_ids)]


def make_registry(backbone: Backbone, cfg: EngineConfig) -> tuple[PromptSet, list[PromptSet]]:
    """The single-task set and ``cfg.tasks`` registered sets of one geometry with varied C, P and top-k.

    Every registered set has a pool, so a mixed batch does the same work per row as a single-task one and
    the comparison measures the cost of mixing, not a cheaper workload.

    Args:
        backbone: the loaded backbone (the sets match its depth, width and fingerprint).
        cfg: prompt length, pool size, share blocks, top-k and the number of tasks.
    """
    gen = torch.Generator().manual_seed(cfg.seed)

    def make(i: int, classes: int, pool: int, top_k: int) -> PromptSet:
        names = [f"t{i}-c{c}" for c in range(classes)]
        return init_prompt_set(
            backbone.info,
            names,
            prompt_length=cfg.prompt_length,
            pool_size=pool,
            share_blocks=cfg.share_blocks,
            top_k=top_k,
            seed=cfg.seed * 100_003 + i,
        )

    single = make(0, 100, cfg.pool_size, cfg.top_k)
    registry = []
    for i in range(cfg.tasks):
        classes = int(torch.randint(2, 101, (1,), generator=gen))
        pool = int(torch.randint(max(1, cfg.pool_size // 2), cfg.pool_size + 1, (1,), generator=gen))
        top_k = int(torch.randint(1, min(cfg.top_k, pool) + 1, (1,), generator=gen))
        registry.append(make(i + 1, classes, pool, top_k))
    return single, registry


def draw_mixed(batch: int, n_tasks: int, per_batch: int, gen: torch.Generator) -> MixedDraw:
    """Draw ``min(per_batch, batch, n_tasks)`` distinct tasks and give every one at least one row.

    Args:
        batch: rows in the batch.
        n_tasks: registered tasks to draw from.
        per_batch: distinct tasks wanted per batch.
        gen: random generator (seeded by the caller, so runs are reproducible).
    """
    k = min(per_batch, batch, n_tasks)
    task_ids = torch.randperm(n_tasks, generator=gen)[:k].tolist()
    slots = (torch.arange(batch) % k)[torch.randperm(batch, generator=gen)]
    return MixedDraw(task_ids=task_ids, slots=slots)


def _to_device(ps: PromptSet, device: torch.device) -> PromptSet:
    # Resident sets live on the device (the service's slot table); the bank is stacked there per batch.
    if device.type == "cpu":
        return ps
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(ps).items()}
    return PromptSet(**moved)


def precompute_kvs(model: torch.nn.Module, sets: Sequence[PromptSet]) -> KVs:
    """Every set's shared keys/values, as the service computes them once when a set becomes resident."""
    with torch.inference_mode():
        return {id(ps): precompute_shared_kv(model, ps) for ps in sets}


def without_pool(ps: PromptSet) -> PromptSet:
    """The deep-VPT set of the same shared prompt and head (one pass, no group prompts)."""
    return dataclasses.replace(ps, group_prompts=None, group_keys=None, top_k=1)


def build_variants(
    model: torch.nn.Module,
    images: torch.Tensor,
    single: PromptSet,
    registry: Sequence[PromptSet],
    kvs: KVs | None = None,
) -> dict[str, Callable[[MixedDraw], Any]]:
    """One callable per variant; each takes the repeat's mixed draw (ignored by the one-task variants).

    Args:
        model: the frozen backbone, on the benchmark device.
        images: ``[B, 3, H, W]`` input batch.
        single: the set used by the one-task variants.
        registry: the registered sets the mixed variants draw from.
        kvs: precomputed shared keys/values by set (``precompute_kvs``); ``None``: computed per forward.
    """
    device = images.device
    vpt = without_pool(single)
    *first_blocks, last_block = model.blocks
    last_kv = uses_prompt_kv(last_block)

    def bank(sets: Sequence[PromptSet], kv_of: Sequence[PromptSet] | None = None) -> PromptBank:
        kv = None if kvs is None else [kvs.get(id(ps)) for ps in (kv_of or sets)]
        return PromptBank.stack(sets, device=device, shared_kv=kv)

    def plain(_: MixedDraw) -> torch.Tensor:
        return model.forward_head(model.forward_features(images), pre_logits=True)

    def two_pass(_: MixedDraw) -> torch.Tensor:
        return two_pass_batched(model, images, single)

    def append_single(_: MixedDraw) -> torch.Tensor:
        return prompted_forward(model, images, PromptBank.stack([single], device=device), append_prompts=True).logits

    def ours_single(_: MixedDraw) -> torch.Tensor:
        return prompted_forward(model, images, bank([single])).logits

    def ours_mixed(draw: MixedDraw) -> torch.Tensor:
        return prompted_forward(model, images, bank([registry[t] for t in draw.task_ids]), draw.slots.to(device)).logits

    def per_task(draw: MixedDraw) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for tid, rows in draw.groups():
            out.append((rows, prompted_forward(model, images[rows.to(device)], bank([registry[tid]])).logits))
        return out

    def vpt_single(_: MixedDraw) -> torch.Tensor:
        return prompted_forward(model, images, bank([vpt], kv_of=[single])).logits

    def plain_last_token(_: MixedDraw) -> torch.Tensor:
        x = embed(model, images)
        for block in first_blocks:
            x = block(x)
        x = kv_prompted_block(last_block, x, [], pooled_tokens(model)) if last_kv else last_block(x)
        return pool_features(model, x)

    return {
        "plain": plain,
        "two_pass": two_pass,
        "append_single": append_single,
        "ours_single": ours_single,
        "ours_mixed": ours_mixed,
        "per_task": per_task,
        "vpt_single": vpt_single,
        "plain_last_token": plain_last_token,
    }


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def check_batch(
    model: torch.nn.Module,
    images: torch.Tensor,
    single: PromptSet,
    registry: Sequence[PromptSet],
    draw: MixedDraw,
    atol: float,
    autocast: Callable[[], Any],
    kvs: KVs | None = None,
) -> dict[str, float]:
    """Fail loudly unless the variants compute the same logits; return the largest differences seen.

    Checks: ours single-task, the append layout and deep VPT == the published two-pass algorithm; every
    mixed-task row == its task run alone (the per-task variant), padding classes -inf; every task run alone ==
    the two-pass algorithm on its rows.

    Raises:
        CheckFailed: naming the variant, the task and the difference.
    """
    fns = build_variants(model, images, single, registry, kvs)
    with torch.inference_mode(), autocast():
        ours = fns["ours_single"](draw)
        ref = two_pass_batched(model, images, single)
        one_task = {
            "append_vs_two_pass": _max_diff(fns["append_single"](draw), ref),
            "vpt_vs_two_pass": _max_diff(
                fns["vpt_single"](draw), two_pass_batched(model, images, without_pool(single))
            ),
            "plain_last_token_vs_plain": _max_diff(fns["plain_last_token"](draw), fns["plain"](draw)),
        }
        mixed = fns["ours_mixed"](draw)
        grouped = fns["per_task"](draw)
        ref_tasks = [
            two_pass_batched(model, images[rows.to(images.device)], registry[tid]) for tid, rows in draw.groups()
        ]
    diffs = {"ours_vs_two_pass": _max_diff(ours, ref), **one_task, "mixed_vs_alone": 0.0, "alone_vs_two_pass": 0.0}
    for name in ("ours_vs_two_pass", *one_task):
        if not diffs[name] <= atol:
            variant, reference = name.split("_vs_")
            raise CheckFailed(f"{variant} vs {reference.replace('_', '-')}: max difference {diffs[name]:.3g} > {atol}")
    for (tid, _), (rows, alone), task_ref in zip(draw.groups(), grouped, ref_tasks, strict=True):
        classes = registry[tid].num_classes
        rows = rows.to(mixed.device)
        mixed_rows = mixed[rows]
        if not bool(torch.isneginf(mixed_rows[:, classes:]).all()):
            raise CheckFailed(f"ours_mixed: task {tid} rows have finite logits past its {classes} classes")
        d_mixed = _max_diff(mixed_rows[:, :classes], alone[:, :classes])
        d_ref = _max_diff(alone[:, :classes], task_ref)
        if not (alone.shape[1] == classes and d_mixed <= atol and d_ref <= atol):
            raise CheckFailed(
                f"task {tid} (rows {rows.tolist()}): mixed vs alone {d_mixed:.3g}, alone vs two-pass {d_ref:.3g}, "
                f"tolerance {atol}, head width {alone.shape[1]} for {classes} classes"
            )
        diffs["mixed_vs_alone"] = max(diffs["mixed_vs_alone"], d_mixed)
        diffs["alone_vs_two_pass"] = max(diffs["alone_vs_two_pass"], d_ref)
    return diffs


def time_round_robin(
    fns: dict[str, Callable[[MixedDraw], Any]],
    draws: Sequence[MixedDraw],
    warmup: int,
    sync: Callable[[], None],
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of every variant, one call each per repeat (one repeat per draw).

    The starting variant rotates every repeat so none always runs first (caches, frequency boost).

    Args:
        fns: variant name -> callable taking the repeat's draw.
        draws: one mixed draw per repeat (the number of repeats).
        warmup: untimed rounds before timing (allocator, lazy init, first-touch of weights).
        sync: waits for the device (no-op on CPU).
        clock: seconds counter (wall clock, or process CPU time on a shared CPU).
    """
    names = list(fns)
    for w in range(warmup):
        for name in names:
            fns[name](draws[w % len(draws)])
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r, draw in enumerate(draws):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            fns[name](draw)
            sync()
            times[name].append(clock() - start)
    return times


def run_engine(cfg: EngineConfig, argv: Sequence[str] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load, build the registry, check every batch size, then time all variants. Returns the JSON report.

    Args:
        cfg: what to run.
        argv: the command line it came from, recorded in the report.
        log: progress sink (stderr in the CLI).

    Raises:
        CheckFailed: when the variants disagree (before any timing).
    """
    cfg.set_threads()
    retained = retain_freed_memory(cfg.host_memory_retain)  # before the first large allocation
    device = torch.device(cfg.device)
    weights = cfg.weights or default_weights(cfg.backbone)
    backbone = load_backbone(cfg.backbone, weights=weights, img_size=cfg.img_size)
    model = backbone.model.to(device)
    single, registry = make_registry(backbone, cfg)
    single, registry = _to_device(single, device), [_to_device(ps, device) for ps in registry]
    kvs = precompute_kvs(model, [single, *registry])
    dtype = COMPUTE_DTYPES[cfg.dtype]
    atol = cfg.atol if cfg.atol is not None else (FLOAT32_LOGIT_ATOL if dtype == torch.float32 else AUTOCAST_LOGIT_ATOL)

    def device_autocast() -> Any:
        return autocast(device, dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    image_shape = backbone.info.input_size
    report: dict[str, Any] = {
        "benchmark": "engine",
        "config": {**asdict(cfg), "weights": backbone.info.weights},
        "backbone": backbone.info.to_dict(),
        "machine": {**run_metadata(device, ["engine", *argv]), "host_memory_retained": retained},
        "checks": {},
        "results": [],
    }
    log(
        f"engine: {cfg.backbone} ({backbone.info.weights}) {image_shape} {cfg.dtype} on {device}, "
        f"{torch.get_num_threads()} threads, {cfg.tasks} tasks registered"
    )
    for batch in cfg.batch_sizes:
        images = torch.randn(batch, *image_shape, generator=gen).to(device)
        draws = [draw_mixed(batch, cfg.tasks, cfg.tasks_per_batch, gen) for _ in range(cfg.repeats)]
        checks = check_batch(model, images, single, registry, draws[0], atol, device_autocast, kvs)
        report["checks"][str(batch)] = checks
        fns = build_variants(model, images, single, registry, kvs)
        with torch.inference_mode(), device_autocast():
            times = time_round_robin(fns, draws, cfg.warmup, sync, CLOCKS[cfg.clock])
        result = summarise(batch, times)
        result["distinct_tasks"] = len(draws[0].task_ids)
        report["results"].append(result)
        log(f"  batch {batch}: " + ", ".join(f"{n} {v['images_per_s']:.1f}/s" for n, v in result["variants"].items()))
    return report


COMMAND = BenchmarkCommand("engine", EngineConfig, lambda cfg, argv, log: run_engine(cfg, argv, log), markdown, __doc__)
parse_args = COMMAND.parse_args
main = COMMAND.main
