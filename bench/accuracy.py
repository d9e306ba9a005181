"""Accuracy ablation on CIFAR-10-LT with the real DeiT-Tiny: linear probe vs phase 1 (deep VPT) vs full LPT.

``python -m bench accuracy [--img-size 64 --epochs1 6 --epochs2 6 ...] [--markdown docs/accuracy.md]``

The long-tailed training set is cut from ``cifar10-jpg.zip``: class ``i`` (sorted names) keeps its first
``int(500 * 0.01 ** (i / 9))`` training images (500 down to 5, 1,236 in all); the whole balanced test set
(10,000 images) is evaluated unless ``--val-max-per-class`` cuts it. All three rows use the same images:
the probe is logistic regression on frozen, prompt-free features; phase 1 and LPT are one trainer run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import config_parser, cpu_model, option, parse_config
from bench.real_data import CIFAR_ZIP, DEIT_TINY, DEIT_WEIGHTS, missing
from lpt.backbone import load_backbone
from trainer.config import DistContext, TrainConfig
from trainer.data import load_dataset, long_tailed_subset, per_class_subset
from trainer.evaluate import accuracy_report, describe_selection, summary
from trainer.loop import Trainer
from trainer.probe import extract_features, fit_linear_probe, fit_logit_adjusted_probe, probe_counts
from trainer.prompt_init import HEAD_INITS, PROMPT_INITS


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class AccuracyConfig:
    """The ablation's data, trainer settings and machine; trainer settings default to ``TrainConfig``'s own."""

    zip: str = option(str(CIFAR_ZIP), help="CIFAR-10 as JPEGs (train/ and test/)")
    weights: str = option(str(DEIT_WEIGHTS), help="DeiT-Tiny weights")
    img_size: int = option(224, help="backbone input size (224: the model's own)")
    n_max: int = option(500, help="training images of the largest class")
    imbalance_ratio: float = option(100.0, help="largest / smallest class")
    split_seed: int | None = option(
        None, help="another long-tailed split: seeded class order (head vs tail) and a seeded choice of images"
    )
    val_max_per_class: int | None = option(None, help="evaluate on this many test images per class (default all)")
    epochs1: int = option(5)
    epochs2: int = option(5)
    batch_size: int = option(64)
    lr: float | None = option(None, help="the trainer's default unless given")
    prompt_length: int = option(TrainConfig.prompt_length)
    pool_size: int = option(TrainConfig.pool_size)
    top_k: int = option(TrainConfig.top_k)
    share_blocks: int = option(TrainConfig.share_blocks)
    min_crop_scale: float = option(TrainConfig.min_crop_scale)
    prompt_init: str = option(TrainConfig.prompt_init, choices=PROMPT_INITS)
    head_init: str = option(TrainConfig.head_init, choices=HEAD_INITS)
    head_dropout: float = option(TrainConfig.head_dropout)
    device: str = option(default_factory=default_device)
    workers: int = option(0)
    seed: int = option(0)
    la_scales: tuple[float, ...] | None = option(
        None, help="probes only: the logit-adjusted probe at each of these comma-separated scales (how s was chosen)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser(AccuracyConfig, "python -m bench accuracy", __doc__)
    parser.add_argument("--markdown", type=Path, help="write a Markdown page with the table, machine, date and command")
    return parser


def parse_args(argv: list[str] | None) -> tuple[AccuracyConfig, argparse.Namespace]:
    """Command-line options -> (config, namespace with ``json`` and ``markdown``)."""
    return parse_config(build_parser(), AccuracyConfig, argv)


def machine() -> str:
    cpu = cpu_model()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs visible (shared with other jobs), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads){gpu}, Python {platform.python_version()}"
    )


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        "| method | trainable params | overall | many (>100) | medium (20-100) | few (<20) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        cells = " | ".join(fmt(r[k]) for k in ("overall", "many", "medium", "few"))
        lines.append(f"| {name} | {r['params']:,} | {cells} |")
    return "\n".join(lines)


def run(cfg: AccuracyConfig) -> dict[str, Any]:
    if reason := missing(Path(cfg.zip), Path(cfg.weights)):
        raise SystemExit(f"bench accuracy: {reason}")
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(DEIT_TINY, cfg.weights, img_size=cfg.img_size)
    train = long_tailed_subset(
        load_dataset(f"{cfg.zip}/train", "train"), cfg.imbalance_ratio, cfg.n_max, seed=cfg.split_seed
    )
    val = load_dataset(f"{cfg.zip}/test", "val")
    if cfg.val_max_per_class:
        val = per_class_subset(val, cfg.val_max_per_class)
    val = val.with_classes(train.class_names)
    counts, names, num_classes = train.class_counts(), train.class_names, len(train.class_names)
    print(f"train {len(train)} images {counts}; test {len(val)} images", file=sys.stderr)

    t0 = time.perf_counter()
    feats, targets = extract_features(backbone, train, cfg.device)
    probe = fit_linear_probe(feats, targets, num_classes)
    la_probe = fit_logit_adjusted_probe(feats, targets, num_classes)
    val_feats, val_targets = extract_features(backbone, val, cfg.device)
    probe_report = accuracy_report(probe_counts(probe, val_feats, val_targets, num_classes), counts, names)
    la_report = accuracy_report(probe_counts(la_probe, val_feats, val_targets, num_classes), counts, names)
    probe_s = time.perf_counter() - t0
    if cfg.la_scales:
        return {"la_scales": _la_scales(cfg.la_scales, feats, targets, val_feats, val_targets, counts, names)}

    train_cfg = TrainConfig(
        epochs1=cfg.epochs1,
        epochs2=cfg.epochs2,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        prompt_length=cfg.prompt_length,
        pool_size=cfg.pool_size,
        top_k=cfg.top_k,
        share_blocks=cfg.share_blocks,
        min_crop_scale=cfg.min_crop_scale,
        prompt_init=cfg.prompt_init,
        head_init=cfg.head_init,
        head_dropout=cfg.head_dropout,
        seed=cfg.seed,
        workers=cfg.workers,
        progress=False,
    )
    t0 = time.perf_counter()
    trainer = Trainer(backbone, train, val, train_cfg, DistContext(device=torch.device(cfg.device)), log=_log)
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    phase1_params = result.phase1_prompt_set.num_params
    rows = [
        (
            "linear probe (frozen features)",
            {**summary(probe_report), "params": probe.weight.numel() + probe.bias.numel()},
        ),
        (
            "logit-adjusted linear probe (frozen features)",
            {**summary(la_report), "params": la_probe.weight.numel()},
        ),
        ("phase 1: shared prompt (deep VPT)", {**summary(result.report["phase1"]), "params": phase1_params}),
        ("LPT: phase 1 + phase 2", {**summary(result.report), "params": result.prompt_set.num_params}),
    ]
    return {
        "rows": rows,
        "table": table(rows),
        "settings": asdict(cfg),
        "train_counts": counts,
        "test_images": len(val),
        "lr": train_cfg.base_lr,
        "seconds": {"probe": round(probe_s, 1), "train_and_eval": round(train_s, 1)},
        "phase2": result.report.get("phase2"),
        "warnings": result.report.get("warnings", []),
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _la_scales(scales: tuple[float, ...], feats, targets, val_feats, val_targets, counts, names) -> dict[str, Any]:
    rows = {}
    for scale in scales:
        probe = fit_logit_adjusted_probe(feats, targets, len(names), scale=scale)
        rows[f"{scale:g}"] = summary(
            accuracy_report(probe_counts(probe, val_feats, val_targets, len(names)), counts, names)
        )
    return rows


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def markdown(result: dict[str, Any], command: str) -> str:
    s = result["settings"]
    return f"""# Accuracy ablation: CIFAR-10-LT, DeiT-Tiny

{result["table"]}

Top-1 (%) on {result["test_images"]:,} CIFAR-10 test images (balanced). Groups by training count:
many > 100, medium 20-100, few < 20 (classes: {result["train_counts"]}).

- Data: `cifar10-jpg.zip`, class i keeps its first int({s["n_max"]} * (1/{s["imbalance_ratio"]:g}) ** (i / 9)) training
  images ({sum(result["train_counts"]):,} in all).
- Backbone: DeiT-Tiny/16 (ImageNet-1k weights, `deit_tiny_patch16_224.in1k.safetensors`), frozen, built for
  {s["img_size"]} px.
- Linear probe: logistic regression on the frozen, prompt-free class-token features (L-BFGS).
- Logit-adjusted probe (the long-tail baseline, Menon et al. 2021): a cosine classifier on the same features,
  trained with cross-entropy on `s * cos + log prior` and evaluated on the cosine logits alone.
- Phase 1 and LPT: one `trainer` run, {s["epochs1"]} + {s["epochs2"]} epochs, B = {s["batch_size"]},
  lr = {result["lr"]:g}, L = {s["prompt_length"]}, P = {s["pool_size"]}, top-k = {s["top_k"]}, S = {s["share_blocks"]},
  prompt init `{s["prompt_init"]}`, head init `{s["head_init"]}`, head dropout {s["head_dropout"]}, A-GCL with dual
  sampling ([method.md](method.md)); split {
        "the first images of each class"
        if s.get("split_seed") is None
        else f"seed {s['split_seed']} (seeded class order and images)"
    }.
- Phase 2 on the test set: {_phase2_line(result.get("phase2"))}.
- Machine: {result["machine"]}.
- Date: {result["date"]}; wall time: probe {result["seconds"]["probe"]} s, training + evaluation
  {result["seconds"]["train_and_eval"]} s.

Command:

```
{command}
```
"""


def _phase2_line(phase2: dict[str, Any] | None) -> str:
    return describe_selection(phase2) if phase2 else "no pool"


def main(argv: list[str] | None = None) -> int:
    """Run the ablation and print the table.

    Args:
        argv: options (see ``--help``).
    """
    cfg, args = parse_args(argv)
    result = run(cfg)
    if "la_scales" in result:
        for scale, r in result["la_scales"].items():
            print(
                f"logit-adjusted probe s={scale}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if v is not None)
            )
        return 0
    print(result["table"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        command = "python -m bench accuracy " + shlex.join(argv if argv is not None else sys.argv[2:])
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(result, command))
    return 0
