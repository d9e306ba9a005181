"""Training settings, the data-parallel context, results and the learning-rate / loss-weight schedules."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lpt.prompt_set import PromptSet

# 40x the authors' 0.02 * B / 256, which comes with thousands of steps: at a few hundred steps their rate leaves
# the prompts where they started. The largest rate of a short-run sweep at which phase 2 never lost to phase 1,
# a quarter of the rate that diverged (DeiT-Tiny, CIFAR-10-LT: docs/trainer.md). ``--lr`` sets any other rate.
LR_PER_256 = 0.8


@dataclass
class TrainConfig:
    """Hyper-parameters (defaults: the method note's ViT-B/16 settings).

    Args:
        epochs1: phase-1 epochs.
        epochs2: phase-2 epochs (0, or pool_size 0, gives a plain deep-VPT prompt set).
        batch_size: B, images per batch summed over data-parallel processes (each step draws two).
        lr: base learning rate; ``None`` gives ``LR_PER_256 * B / 256``.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        warmup_epochs: linear warm-up from ``warmup_lr``, then cosine to 0, per phase.
        warmup_lr: first learning rate of the warm-up.
        prompt_length: L.
        pool_size: P.
        top_k: k.
        share_blocks: S.
        head_scale: s.
        images_per_class: images per sampled class in class-balanced batches.
        ib_weight: instance-balanced loss weight at epoch 0 (decays linearly to 0).
        sim_weight: weight of the key-similarity term.
        margin: A-GCL target margin.
        noise_mul: A-GCL cloud multiplier.
        label_smoothing: A-GCL label smoothing.
        min_crop_scale: RandomResizedCrop's lower area bound.
        prompt_init: ``data`` (mean patch tokens plus the authors' noise), ``normal`` (the authors' truncated
            normal, std 0.02) or ``vpt`` (VPT's uniform init); see ``trainer.prompt_init``.
        head_init: ``class-mean`` (each head row starts at its class's mean feature under the starting
            prompt) or ``random`` (unit-norm random rows, the authors').
        head_dropout: dropout on the feature before the cosine head while training (the authors': 0.1).
        steps_per_epoch: ``None`` gives ``ceil(len(train) / batch_size)``.
        seed: seeds the init, the samplers, the augmentation and the A-GCL noise.
        workers: DataLoader workers per process.
        amp: bf16 autocast on CUDA.
        eval_batch_size: images per evaluation forward.
        progress: tqdm bars (rank 0).
    """

    epochs1: int = 40
    epochs2: int = 90
    batch_size: int = 256
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    warmup_lr: float = 1e-6
    prompt_length: int = 10
    pool_size: int = 20
    top_k: int = 2
    share_blocks: int = 6
    head_scale: float = 20.0
    images_per_class: int = 4
    ib_weight: float = 0.5
    sim_weight: float = 0.5
    margin: float = 0.1
    noise_mul: float = 0.5
    label_smoothing: float = 0.1
    min_crop_scale: float = 0.08
    prompt_init: str = "data"
    head_init: str = "class-mean"
    head_dropout: float = 0.1
    steps_per_epoch: int | None = None
    seed: int = 0
    workers: int = 0
    amp: bool = True
    eval_batch_size: int = 128
    progress: bool = True

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else LR_PER_256 * self.batch_size / 256

    def resume_key(self) -> dict[str, Any]:
        """Settings a checkpoint must agree on to be resumed (not workers, progress, eval batch)."""
        out = asdict(self)
        for key in ("workers", "progress", "eval_batch_size"):
            out.pop(key)
        out["lr"] = self.base_lr
        return out


@dataclass
class DistContext:
    """This process's place in a data-parallel run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@dataclass
class TrainResult:
    """What a (possibly interrupted) run produced.

    Attributes:
        finished: False when ``stop_after_epochs`` cut the run short (the checkpoint holds the state).
        prompt_set: the final prompt set (phase 2, or phase 1 without a pool).
        phase1_prompt_set: the phase-1 (deep VPT) prompt set.
        report: overall/many/medium/few, ``phase1``, ``per_class``, ``history``.
        predictions: final top-1 class per validation image, in dataset order (single-process runs only).
    """

    finished: bool
    prompt_set: PromptSet | None = None
    phase1_prompt_set: PromptSet | None = None
    report: dict[str, Any] = field(default_factory=dict)
    predictions: list[int] = field(default_factory=list)


def ib_weight_at(epoch: int, epochs: int, start: float = 0.5) -> float:
    """Instance-balanced loss weight ``max(0, start * (E - e) / E)`` at 0-based epoch ``e`` of ``E``."""
    return max(0.0, start * (epochs - epoch) / epochs) if epochs > 0 else 0.0


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, warmup_lr: float) -> float:
    """Linear warm-up from ``warmup_lr`` over ``warmup_steps``, then cosine from ``base_lr`` to 0.

    Args:
        step: 0-based step within the phase.
        total_steps: steps in the phase.
        warmup_steps: steps of warm-up (one epoch by default).
        base_lr: peak learning rate.
        warmup_lr: first learning rate.
    """
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while training on CPU, restoring the caller's setting afterwards.

    Phase 2's backward through the top-k gather of group prompts accumulates with several threads in
    an order that varies between runs; the deterministic kernel makes a seed reproduce bit for bit.
    """
    if not enabled:
        yield
        return
    before, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
