"""Training settings, the data-parallel context, results and the learning-rate / loss-weight schedules."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from lpt.prompt_set import DEFAULT_HEAD_SCALE, PromptSet

# 40x the authors' 0.02 * B / 256, which comes with thousands of steps: at a few hundred steps their rate leaves
# the prompts where they started. The largest rate of a short-run sweep at which phase 2 never lost to phase 1,
# a quarter of the rate that diverged (DeiT-Tiny, CIFAR-10-LT: docs/trainer.md). ``--lr`` sets any other rate.
LR_PER_256 = 0.8


# The choices of ``TrainConfig.prompt_init`` and ``head_init`` (``trainer.prompt_init`` implements them).
PromptInit = Literal["data", "normal", "vpt"]
HeadInit = Literal["class-mean", "random"]


def setting(default: Any, help: str, unset: str | None = None) -> Any:
    """A ``TrainConfig`` field: its default and the help ``lpt-train --help`` shows for its flag.

    Args:
        default: the field's default.
        help: what the setting does (one line).
        unset: what a ``None`` default resolves to, shown as the flag's default.
    """
    return field(default=default, metadata={"help": help, "unset": unset})


@dataclass
class TrainConfig:
    """Hyper-parameters (defaults: the method note's ViT-B/16 settings, except the recipe in docs/trainer.md).

    Every field is a flag of ``lpt-train`` (``batch_size``: ``--batch-size``) and a ``--config`` key;
    ``trainer.cli`` generates both from the fields, with the help and default declared here.
    """

    epochs1: int = setting(40, "phase-1 epochs (shared prompt and head)")
    epochs2: int = setting(90, "phase-2 epochs (group-prompt pool); 0, or --pool-size 0, gives a deep-VPT prompt set")
    batch_size: int = setting(256, "B, images per step summed over processes (each step draws 2 x B)")
    lr: float | None = setting(None, "base learning rate", unset=f"{LR_PER_256} * B / 256")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(0.01, "SGD weight decay")
    warmup_epochs: int = setting(1, "epochs of linear warm-up from --warmup-lr, then cosine to 0 (per phase)")
    warmup_lr: float = setting(1e-6, "first learning rate of the warm-up")
    prompt_length: int = setting(10, "L, prompt tokens per block")
    pool_size: int = setting(20, "P, group prompts (0: deep VPT only)")
    top_k: int = setting(2, "k, group prompts averaged per image")
    share_blocks: int = setting(6, "S, blocks with the shared prompt only")
    head_scale: float = setting(DEFAULT_HEAD_SCALE, "s, scale of the cosine head")
    images_per_class: int = setting(4, "images per sampled class in the class-balanced batches")
    ib_weight: float = setting(0.5, "instance-balanced loss weight at epoch 0 (decays linearly to 0)")
    sim_weight: float = setting(0.5, "weight of the key-similarity term")
    margin: float = setting(0.1, "A-GCL margin, subtracted from the target cosine logit")
    noise_mul: float = setting(0.5, "A-GCL cloud multiplier")
    label_smoothing: float = setting(0.1, "A-GCL label smoothing")
    min_crop_scale: float = setting(0.08, "RandomResizedCrop's lower area bound")
    # setting() returns a dataclasses.field; ruff knows that only for the plain immutable annotations.
    prompt_init: PromptInit = setting(  # noqa: RUF009
        "data", "data (mean patch tokens + noise), normal (truncated normal, std 0.02, the authors') or vpt (uniform)"
    )
    head_init: HeadInit = setting(  # noqa: RUF009
        "class-mean", "class-mean (each row at its class's mean feature) or random (unit-norm rows, the authors')"
    )
    head_dropout: float = setting(0.1, "dropout on the feature before the cosine head while training")
    steps_per_epoch: int | None = setting(None, "steps per epoch", unset="ceil(train images / B)")
    seed: int = setting(0, "seeds the init, the samplers, the augmentation and the A-GCL noise")
    workers: int = setting(0, "DataLoader workers per process")
    amp: bool = setting(True, "bf16 autocast on CUDA")
    eval_batch_size: int = setting(128, "images per evaluation forward")
    progress: bool = setting(True, "tqdm progress bars (rank 0)")

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
