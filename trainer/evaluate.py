"""Evaluation: overall / many / medium / few top-1, per-class accuracy, a JSON-ready report and a PNG.

Groups follow the training count of each class (method note): many > 100, medium 20-100, few < 20.
A group's accuracy is the mean of its classes' accuracies (the usual ``shot_acc`` of long-tailed
papers; equal to the pooled top-1 on a balanced test set); ``overall`` is the top-1 over all images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from lpt.forward import PromptBank, PromptedOutput, prompted_forward

MANY, FEW = 100, 20
GROUPS = ("many", "medium", "few")
# matplotlib (plots) and tqdm (progress bars) come with the trainer's extra; serving needs neither.
INSTALL_TRAIN_EXTRA = "pip install 'lpt-serve[train]'"


def group_of(train_count: int) -> str:
    """``many`` (> 100 training images), ``medium`` (20-100) or ``few`` (< 20)."""
    if train_count > MANY:
        return "many"
    if train_count < FEW:
        return "few"
    return "medium"


@dataclass
class EvalCounts:
    """Per-class correct / total counts, plus per-image predictions when gathered on one process."""

    correct: torch.Tensor
    total: torch.Tensor
    predictions: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    selection: torch.Tensor | None = None  # [C, P] times each pool entry was selected, by true class
    logits: torch.Tensor | None = None  # [N, C] float32 logits in dataset order (``keep_logits``)
    logit_targets: torch.Tensor | None = None  # [N] their labels

    @property
    def overall(self) -> float:
        return 100.0 * float(self.correct.sum()) / max(1, int(self.total.sum()))


def accuracy_report(counts: EvalCounts, train_counts: Sequence[int], class_names: Sequence[str]) -> dict[str, Any]:
    """Overall, many/medium/few (percent, ``None`` for an empty group) and per-class rows.

    Args:
        counts: evaluation counts.
        train_counts: training images per class.
        class_names: index -> name.
    """
    per_class = []
    by_group: dict[str, list[float]] = {g: [] for g in GROUPS}
    for c, name in enumerate(class_names):
        total = int(counts.total[c])
        acc = 100.0 * float(counts.correct[c]) / total if total else None
        group = group_of(int(train_counts[c]))
        if acc is not None:
            by_group[group].append(acc)
        per_class.append(
            {"class": name, "train_count": int(train_counts[c]), "test_count": total, "accuracy": acc, "group": group}
        )
    report: dict[str, Any] = {"overall": counts.overall}
    for group in GROUPS:
        accs = by_group[group]
        report[group] = sum(accs) / len(accs) if accs else None
    report["per_class"] = per_class
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The four headline numbers of a report."""
    return {k: report[k] for k in ("overall", *GROUPS)}


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere (CPU runs stay in float32 and deterministic)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def evaluate(
    predict: Callable[[torch.Tensor], torch.Tensor | PromptedOutput],
    dataset: Dataset,
    num_classes: int,
    device: torch.device,
    batch_size: int = 128,
    workers: int = 0,
    amp: bool = False,
    progress: bool = False,
    keep_logits: bool = False,
) -> EvalCounts:
    """Top-1 counts of ``predict`` (images -> logits) over ``dataset``, split across data-parallel ranks.

    Args:
        predict: maps a preprocessed image batch to ``[B, C]`` logits, or to a ``PromptedOutput`` (whose
            group-prompt selections are then counted per class in ``EvalCounts.selection``).
        dataset: yields (tensor, target) with the eval transform applied.
        num_classes: C.
        device: where the batches go.
        batch_size: images per forward.
        workers: DataLoader workers.
        amp: bf16 autocast on CUDA.
        progress: show a tqdm bar.
        keep_logits: also return every image's logits and label (gathered from every rank, in dataset order).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if _is_distributed() else (0, 1)
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=workers)
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    predictions: list[int] = []
    targets: list[int] = []
    selection: torch.Tensor | None = None
    kept: list[torch.Tensor] = []
    for images, target in _bar(loader, progress, "eval"):
        with autocast(device, amp):
            out = predict(images.to(device, non_blocking=True))
        logits = out.logits if isinstance(out, PromptedOutput) else out
        if isinstance(out, PromptedOutput) and out.selected.numel():
            selection = _count_selection(selection, out.selected.cpu(), target, num_classes)
        pred = logits.float().argmax(dim=1).cpu()
        if keep_logits:
            kept.append(logits.float().cpu())
        total += torch.bincount(target, minlength=num_classes)
        correct += torch.bincount(target[pred == target], minlength=num_classes)
        predictions.extend(pred.tolist())
        targets.extend(target.tolist())
    all_logits = all_targets = None
    if keep_logits:
        all_logits, all_targets = _gathered_logits(kept, targets, indices, num_classes, world)
    if world > 1:
        stacked = torch.stack([correct, total])
        dist.all_reduce(stacked)
        correct, total = stacked[0], stacked[1]
        predictions, targets = [], []  # per-image order is only meaningful on one process
        if selection is not None:
            dist.all_reduce(selection)
    return EvalCounts(
        correct=correct,
        total=total,
        predictions=predictions,
        targets=targets,
        selection=selection,
        logits=all_logits,
        logit_targets=all_targets,
    )


def _gathered_logits(
    kept: list[torch.Tensor], targets: list[int], indices: list[int], num_classes: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's logits (and labels), or every rank's put back in dataset order under data parallelism."""
    logits = torch.cat(kept) if kept else torch.zeros(0, num_classes)
    labels = torch.tensor(targets, dtype=torch.long)
    if world == 1:
        return logits, labels
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (indices, logits, labels))
    order = torch.tensor([i for part in parts for i in part[0]]).argsort()
    return torch.cat([p[1] for p in parts])[order], torch.cat([p[2] for p in parts])[order]


def _count_selection(
    selection: torch.Tensor | None, selected: torch.Tensor, target: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Add a batch's ``[B, k]`` selected pool indices (``-1``: none) to the ``[C, P]`` per-class counts."""
    pool = int(selected.max()) + 1
    if selection is None or selection.shape[1] < pool:
        grown = torch.zeros(num_classes, pool, dtype=torch.long)
        if selection is not None:
            grown[:, : selection.shape[1]] = selection
        selection = grown
    valid = selected >= 0
    rows = target[:, None].expand_as(selected)[valid]
    selection.index_put_((rows, selected[valid]), torch.ones_like(rows), accumulate=True)
    return selection


def selection_report(
    selection: torch.Tensor, pool_size: int, train_counts: Sequence[int], keys_start: torch.Tensor, keys: torch.Tensor
) -> dict[str, Any]:
    """How phase 2's pool is used on the evaluation set, and how far its keys moved from their init.

    Returns ``pool_used`` (entries selected at least once), ``pool_size``, ``entropy_bits`` per class group
    (mean over the group's classes of the entropy of that class's selection distribution; 0 when every
    image of a class picks the same entries, log2(P) when spread evenly), ``per_class_entries`` (distinct
    entries each class uses), ``key_angle_deg`` (mean and max angle between each key and its start) and
    ``key_cosine_to_start`` (mean cosine).

    Args:
        selection: ``[C, P']`` selection counts by true class.
        pool_size: P.
        train_counts: training images per class (for the groups).
        keys_start: ``[P, D]`` keys at the start of phase 2.
        keys: ``[P, D]`` keys at the end.
    """
    counts = torch.zeros(selection.shape[0], pool_size, dtype=torch.float64)
    counts[:, : selection.shape[1]] = selection.double()
    probs = counts / counts.sum(1, keepdim=True).clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log2()).sum(1)
    by_group: dict[str, list[float]] = {g: [] for g in GROUPS}
    for c, n in enumerate(train_counts):
        if counts[c].sum() > 0:
            by_group[group_of(int(n))].append(float(entropy[c]))
    cos = torch.nn.functional.cosine_similarity(keys_start.double(), keys.double(), dim=1).clamp(-1, 1)
    angles = torch.rad2deg(torch.arccos(cos))
    return {
        "pool_size": pool_size,
        "pool_used": int((counts.sum(0) > 0).sum()),
        "entropy_bits": {g: (sum(v) / len(v) if v else None) for g, v in by_group.items()},
        "max_entropy_bits": float(torch.log2(torch.tensor(float(pool_size)))),
        "per_class_entries": [int(v) for v in (counts > 0).sum(1)],
        "selection_counts": counts.long().tolist(),
        "key_angle_deg": {"mean": float(angles.mean()), "max": float(angles.max())},
        "key_cosine_to_start": float(cos.mean()),
    }


def describe_selection(phase2: dict[str, Any]) -> str:
    """One line on phase 2's pool use and key movement (log, report page and plot title)."""
    ent = ", ".join(f"{g} {v:.2f}" for g, v in phase2["entropy_bits"].items() if v is not None)
    return (
        f"{phase2['pool_used']} of {phase2['pool_size']} pool entries used; selection entropy per class (bits, max "
        f"{phase2['max_entropy_bits']:.2f}): {ent}; keys turned {phase2['key_angle_deg']['mean']:.1f} degrees on "
        "average from their init"
    )


def prompt_predictor(model: torch.nn.Module, bank: PromptBank) -> Callable[[torch.Tensor], PromptedOutput]:
    """images -> the served forward's output (logits, features and the group-prompt selection)."""
    return lambda images: prompted_forward(model, images, bank)


def _bar(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def _plot_selection(ax, phase2: dict[str, Any], per_class: list[dict[str, Any]]) -> None:
    """Which pool entries each class selects on the evaluation set (rows: classes, most images first)."""
    counts = torch.tensor(phase2["selection_counts"], dtype=torch.float64)
    order = sorted(range(len(per_class)), key=lambda c: -per_class[c]["train_count"])
    share = counts[order] / counts[order].sum(1, keepdim=True).clamp_min(1)
    ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("pool entry")
    ax.set_ylabel("class (most training images at the top)")
    if len(order) <= 30:
        ax.set_yticks(range(len(order)), [f"{per_class[c]['class']} ({per_class[c]['train_count']})" for c in order])
    ax.set_title("phase 2: " + describe_selection(phase2).replace("; ", ";\n"), fontsize=8)


def _plot_reliability(ax, calibration: dict[str, Any]) -> None:
    """Reliability diagram: top-1 accuracy against mean confidence per bin, before and after temperature scaling."""
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    styles = {"before": ("tab:red", "o", "T = 1"), "after": ("tab:blue", "s", f"T = {calibration['temperature']:.3f}")}
    for when, (colour, marker, name) in styles.items():
        rows = [r for r in calibration["reliability"][when] if r["images"]]
        ece = 100 * calibration[when]["overall"]["ece"]
        ax.plot(
            [r["confidence"] for r in rows],
            [r["accuracy"] for r in rows],
            color=colour,
            marker=marker,
            label=f"{name}: ECE {ece:.2f}%",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"mean top-1 confidence ({calibration['bins']} equal-width bins)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(f"reliability on the evaluation set (T fitted on {calibration['data']})", fontsize=9)
    ax.legend(loc="upper left")


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """PNG with the training curves (loss and lr per epoch, both phases), per-class accuracy vs training count,
    phase 2's pool use and the reliability diagram before and after temperature scaling.

    Args:
        report: the trainer's report (``history`` and ``per_class`` are read).
        path: output PNG.
    """
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"plotting needs matplotlib: {INSTALL_TRAIN_EXTRA}") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phase2, calibration = report.get("phase2"), report.get("calibration")
    panels = 2 + bool(phase2) + bool(calibration)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    ax_loss, ax_cls = axes[0], axes[1]
    history = report.get("history", [])
    x = [h["global_epoch"] for h in history]
    ax_loss.plot(x, [h["loss"] for h in history], marker="o", label="train loss")
    ax_loss.set_xlabel("epoch (phase 1 then phase 2)")
    ax_loss.set_ylabel("loss")
    ax_acc = ax_loss.twinx()
    ax_acc.plot(x, [h["train_acc"] for h in history], color="tab:green", marker=".", label="train batch top-1 (%)")
    ax_acc.set_ylabel("train batch top-1 (%)")
    boundary = [h["global_epoch"] for h in history if h["phase"] == 1]
    if boundary and len(boundary) < len(history):
        ax_loss.axvline(max(boundary) + 0.5, color="grey", linestyle="--", linewidth=1)
    ax_loss.set_title("training curves")
    lines = ax_loss.get_legend_handles_labels()[0] + ax_acc.get_legend_handles_labels()[0]
    ax_loss.legend(lines, [ln.get_label() for ln in lines], loc="upper right")

    rows = [r for r in report["per_class"] if r["accuracy"] is not None]
    colours = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    for group, colour in colours.items():
        pts = [r for r in rows if r["group"] == group]
        if not pts:
            continue
        ax_cls.scatter([r["train_count"] for r in pts], [r["accuracy"] for r in pts], c=colour, label=group, s=18)
    phase1 = {r["class"]: r["accuracy"] for r in report.get("phase1", {}).get("per_class", [])}
    if phase1:
        pts = [(r["train_count"], phase1[r["class"]]) for r in rows if phase1.get(r["class"]) is not None]
        ax_cls.scatter(*zip(*pts, strict=True), facecolors="none", edgecolors="grey", s=18, label="phase 1")
    ax_cls.set_xscale("log")
    ax_cls.set_xlabel("training images of the class (log scale)")
    ax_cls.set_ylabel("test top-1 (%)")
    ax_cls.set_title(f"per-class accuracy (overall {report['overall']:.1f}%)")
    ax_cls.legend()
    if phase2:
        _plot_selection(axes[2], phase2, report["per_class"])
    if calibration:
        _plot_reliability(axes[-1], calibration)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
