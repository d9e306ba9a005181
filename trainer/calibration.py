"""Temperature scaling of a prompt set's scores: fit T, then measure ECE, NLL and top-1 before and after.

One temperature per task (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): the served
score of class ``c`` is ``softmax(logits / T)_c``. T is the minimiser of the negative log-likelihood of held-out
labels; dividing every logit by one positive number keeps the arg-max, so top-1 does not change. The NLL is
convex in ``1 / T`` (a log-sum-exp of linear functions minus a linear one), so a golden-section search over the
allowed range (``lpt.prompt_set.TEMPERATURE_RANGE``) finds the minimum without step sizes or restarts.

ECE (expected calibration error): the top-1 confidences go into 15 equal-width bins over (0, 1]; ECE is the
image-weighted mean over bins of ``|accuracy - mean confidence|``. Groups (many / medium / few) take the images
whose true class belongs to the group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lpt.prompt_set import DEFAULT_TEMPERATURE, TEMPERATURE_RANGE
from trainer.evaluate import GROUPS, group_of

ECE_BINS = 15
# Golden-section steps: the bracket shrinks by 0.618 per step, so 80 steps pin 1 / T to far below float32's grain.
_SEARCH_STEPS = 80


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / T)`` in float32, the served scores of a set with temperature ``T``.

    Args:
        logits: ``[N, C]`` the prompted forward's logits (``head_scale * cos``).
        temperature: T.
    """
    return (logits.float() / temperature).softmax(dim=-1)


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / T)`` (float64).

    Args:
        logits: ``[N, C]``.
        targets: ``[N]`` class indices.
        temperature: T.
    """
    return float(F.cross_entropy(logits.double() / temperature, targets))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T in ``TEMPERATURE_RANGE`` that minimises the NLL of ``targets`` under ``softmax(logits / T)``.

    Args:
        logits: ``[N, C]`` held-out logits.
        targets: ``[N]`` their labels.
    """
    if logits.shape[0] == 0:
        raise ValueError("cannot fit a temperature on zero images")
    z, y = logits.double(), targets.long()
    target_logit = z.gather(1, y[:, None]).squeeze(1)

    def loss(inverse: float) -> float:
        return float((torch.logsumexp(inverse * z, dim=1) - inverse * target_logit).mean())

    low, high = 1.0 / TEMPERATURE_RANGE[1], 1.0 / TEMPERATURE_RANGE[0]  # search 1 / T, where the NLL is convex
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = low + (1 - ratio) * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(_SEARCH_STEPS):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = low + (1 - ratio) * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    inverse = (low + high) / 2.0
    return min(max(1.0 / inverse, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])


def reliability(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per equal-width confidence bin over (0, 1]: its bounds, images, mean top-1 confidence and top-1 accuracy.

    Args:
        probs: ``[N, C]`` probabilities.
        targets: ``[N]`` labels.
        bins: number of bins.
    """
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == targets).double()
    # Bin b holds confidences in (b / bins, (b + 1) / bins]; a confidence of exactly 0 cannot occur for a softmax.
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "images": count,
                "confidence": float(confidence[members].mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return rows


def ece(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence (``bins`` equal-width bins), as a fraction in [0, 1].

    Args:
        probs: ``[N, C]`` probabilities.
        targets: ``[N]`` labels.
        bins: number of bins.
    """
    total = probs.shape[0]
    if total == 0:
        return 0.0
    rows = [r for r in reliability(probs, targets, bins) if r["images"]]
    return sum(r["images"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows)


def metrics(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict[str, float]:
    """ECE (fraction), NLL (nats per image) and top-1 (%) of ``softmax(logits / T)`` over the given images."""
    probs = calibrated_probabilities(logits, temperature)
    return {
        "ece": ece(probs, targets),
        "nll": nll(logits, targets, temperature),
        "top1": 100.0 * float((probs.argmax(dim=1) == targets).double().mean()),
        "images": int(targets.shape[0]),
    }


def grouped_metrics(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, train_counts: Sequence[int]
) -> dict[str, dict[str, float] | None]:
    """``metrics`` overall and for the images of each class group (``None`` for a group without images).

    Args:
        logits: ``[N, C]`` evaluation logits.
        targets: ``[N]`` labels.
        temperature: T.
        train_counts: training images per class (they decide each class's group).
    """
    groups = torch.tensor([GROUPS.index(group_of(int(n))) for n in train_counts])
    out: dict[str, dict[str, float] | None] = {"overall": metrics(logits, targets, temperature)}
    for g, name in enumerate(GROUPS):
        members = groups[targets] == g
        out[name] = metrics(logits[members], targets[members], temperature) if bool(members.any()) else None
    return out


def calibration_report(
    calibration: tuple[torch.Tensor, torch.Tensor],
    evaluation: tuple[torch.Tensor, torch.Tensor],
    train_counts: Sequence[int],
    data: str,
) -> dict[str, Any]:
    """Fit T on ``calibration`` and measure ``evaluation`` before (T = 1) and after (the fitted T).

    Args:
        calibration: (logits, labels) the temperature is fitted on.
        evaluation: (logits, labels) the report's numbers are measured on.
        train_counts: training images per class.
        data: which data the temperature was fitted on, as the report shows it.

    Returns:
        ``temperature``, ``data``, ``images`` (calibration images), ``bins``, ``before`` / ``after``
        (``grouped_metrics``), and ``reliability`` (``before`` / ``after`` per-bin rows of the evaluation set).
    """
    temperature = fit_temperature(*calibration)
    logits, targets = evaluation
    return {
        "temperature": temperature,
        "data": data,
        "images": int(calibration[1].shape[0]),
        "bins": ECE_BINS,
        "before": grouped_metrics(logits, targets, DEFAULT_TEMPERATURE, train_counts),
        "after": grouped_metrics(logits, targets, temperature, train_counts),
        "reliability": {
            "before": reliability(calibrated_probabilities(logits, DEFAULT_TEMPERATURE), targets),
            "after": reliability(calibrated_probabilities(logits, temperature), targets),
        },
    }


def describe_calibration(calibration: dict[str, Any]) -> str:
    """One line: T, where it was fitted, and ECE / NLL before and after (log and plot title)."""
    before, after = calibration["before"]["overall"], calibration["after"]["overall"]
    return (
        f"temperature {calibration['temperature']:.3f} (fitted on {calibration['data']}, {calibration['images']} "
        f"images): ECE {100 * before['ece']:.2f}% -> {100 * after['ece']:.2f}%, NLL {before['nll']:.3f} -> "
        f"{after['nll']:.3f}"
    )
