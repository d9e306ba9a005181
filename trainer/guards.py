"""Plain-words warnings for runs that would otherwise quietly write a useless prompt set."""

from __future__ import annotations

from typing import Any

import torch

COLLAPSE_COSINE = 0.98  # mean pairwise feature cosine above which a cosine head barely separates images
CHANCE_FACTOR = 1.5  # batch top-1 below 1.5x chance after the first epoch: not learning


def mean_pairwise_cosine(features: torch.Tensor) -> float | None:
    """Mean cosine similarity between the features of different images (``None`` for fewer than two)."""
    f = torch.nn.functional.normalize(features.float(), dim=1)
    n = f.shape[0]
    return float(((f @ f.t()).sum() - n) / (n * (n - 1))) if n >= 2 else None


def collapse_warning(mean_cos: float | None) -> str | None:
    """A warning when the starting features of different images are nearly identical."""
    if mean_cos is None or mean_cos <= COLLAPSE_COSINE:
        return None
    return (
        f"the starting prompt makes the features of different images nearly identical (mean pairwise "
        f"cosine {mean_cos:.3f}); training may not learn. Try --prompt-init data, or a larger --img-size."
    )


def chance_warning(row: dict[str, Any], num_classes: int) -> str | None:
    """After phase 1's first epoch: a warning when the training batches are still classified at chance.

    Args:
        row: the epoch's history row (``phase``, ``epoch``, ``train_acc`` in percent).
        num_classes: C.
    """
    chance = 100.0 / num_classes
    if not (row["phase"] == 1 and row["epoch"] == 1 and row["train_acc"] < CHANCE_FACTOR * chance):
        return None
    return (
        f"after the first epoch the training batches are classified at chance ({row['train_acc']:.1f}% "
        f"with {num_classes} classes, chance {chance:.1f}%): this run is not learning. Try "
        f"--prompt-init data and --head-init class-mean (the defaults), a larger --lr, or more epochs."
    )
