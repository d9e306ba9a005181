"""Accuracy ablation on CIFAR-10-LT with the real DeiT-Tiny: linear probe vs phase 1 (deep VPT) vs full LPT.

``python -m bench accuracy [--img-size 64 --epochs1 6 --epochs2 6 ...] [--markdown docs/accuracy.md]``

The long-tailed training set is cut from ``cifar10-jpg.zip``: class ``i`` (sorted names) keeps its first
``int(500 * 0.01 ** (i / 9))`` training images (500 down to 5, 1,236 in all); the whole balanced test set
(10,000 images) is evaluated unless ``--val-max-per-class`` cuts it. All three rows use the same images:
the probe is logistic regression on frozen, prompt-free features; phase 1 and LPT are one trainer run.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from bench.alternatives import evaluate_logits, fine_tune, served_scores, serving_throughput, steps_per_epoch
from bench.common import cpu_model
from bench.options import config_parser, fields_from, option, parse_config
from bench.real_data import CIFAR_ZIP, DEIT_TINY, DEIT_WEIGHTS, missing
from lpt.backbone import load_backbone
from lpt.prompt_set import encode
from trainer.calibration import calibration_report, ece
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
    calibration_per_class: int | None = option(
        None,
        help="fit every temperature on this many further test images per class, disjoint from the evaluated ones "
        "(needs --val-max-per-class; default: on the evaluated images, the trainer's default)",
    )
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
    finetune: bool = option(
        True,
        help="also fine-tune the whole backbone (logit-adjusted loss, the trainer's epochs, steps and augmentation)",
    )
    finetune_lr: float = option(0.01, help="fine-tuning's peak SGD learning rate (momentum 0.9, warm-up, cosine)")
    finetune_weight_decay: float = option(1e-4, help="fine-tuning's SGD weight decay")
    served: bool = option(True, help="also score the test images' JPEG bytes through the service's decoder and engine")
    serving_tasks: int = option(
        100, help="tasks in the serving comparison: prompt sets on one backbone vs one model per task (0: skip)"
    )
    serving_batch: int = option(32, help="images per batch in the serving comparison")
    serving_batches: int = option(4, help="timed batches per side in the serving comparison")


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
    """Top-1 per group, trainable parameters, bytes stored per task and ECE before / after calibration."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        "| method | trainable params | bytes stored per task | overall | many (>100) | medium (20-100) | few (<20) "
        "| ECE at T = 1 | ECE calibrated (T) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        cells = " | ".join(fmt(r[k]) for k in ("overall", "many", "medium", "few"))
        cal = r.get("calibration")
        ece = "- | -"
        if cal:
            before, after = 100 * cal["before"]["overall"]["ece"], 100 * cal["after"]["overall"]["ece"]
            ece = f"{before:.2f} | {after:.2f} ({cal['temperature']:.3f})"
        lines.append(f"| {name} | {r['params']:,} | {r.get('bytes', 0):,} | {cells} | {ece} |")
    return "\n".join(lines)


def serving_table(serving: dict[str, Any]) -> str:
    """Images per second serving N tasks: prompt sets on one backbone against one model per task."""
    mib = 1 << 20
    return "\n".join(
        [
            f"| {serving['tasks']} tasks served by one process | images / s | memory for the tasks |",
            "|---|---:|---:|",
            f"| one backbone + a prompt set per task | {serving['prompt_sets_images_per_s']:.1f} | "
            f"{(serving['backbone_bytes'] + serving['tasks'] * serving['prompt_set_resident_bytes']) / mib:,.1f} MiB |",
            f"| a fine-tuned model per task | {serving['models_images_per_s']:.1f} | "
            f"{serving['tasks'] * serving['model_bytes'] / mib:,.1f} MiB |",
        ]
    )


def run(cfg: AccuracyConfig) -> dict[str, Any]:
    if reason := missing(Path(cfg.zip), Path(cfg.weights)):
        raise SystemExit(f"bench accuracy: {reason}")
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(DEIT_TINY, cfg.weights, img_size=cfg.img_size)
    train = long_tailed_subset(
        load_dataset(f"{cfg.zip}/train", "train"), cfg.imbalance_ratio, cfg.n_max, seed=cfg.split_seed
    )
    test = load_dataset(f"{cfg.zip}/test", "val")
    val = per_class_subset(test, cfg.val_max_per_class) if cfg.val_max_per_class else test
    val = val.with_classes(train.class_names)
    calibration = None
    if cfg.calibration_per_class:
        if not cfg.val_max_per_class:
            raise SystemExit("bench accuracy: --calibration-per-class needs --val-max-per-class")
        calibration = _after_first(test, cfg.val_max_per_class, cfg.calibration_per_class)
        calibration = calibration.with_classes(train.class_names)
    counts, names, num_classes = train.class_counts(), train.class_names, len(train.class_names)
    print(f"train {len(train)} images {counts}; test {len(val)} images", file=sys.stderr)

    t0 = time.perf_counter()
    feats, targets = extract_features(backbone, train, cfg.device)
    probe = fit_linear_probe(feats, targets, num_classes)
    la_probe = fit_logit_adjusted_probe(feats, targets, num_classes)
    val_feats, val_targets = extract_features(backbone, val, cfg.device)
    probe_report = accuracy_report(probe_counts(probe, val_feats, val_targets, num_classes), counts, names)
    la_report = accuracy_report(probe_counts(la_probe, val_feats, val_targets, num_classes), counts, names)
    cal_feats, cal_targets = extract_features(backbone, calibration, cfg.device) if calibration else (None, None)
    with torch.no_grad():
        probe_cal, la_cal = (
            _calibrated(
                (p(val_feats), val_targets), counts, None if calibration is None else (p(cal_feats), cal_targets)
            )
            for p in (probe, la_probe)
        )
    probe_s = time.perf_counter() - t0
    if cfg.la_scales:
        return {"la_scales": _la_scales(cfg.la_scales, feats, targets, val_feats, val_targets, counts, names)}

    train_cfg = fields_from(TrainConfig, cfg, progress=False)
    t0 = time.perf_counter()
    trainer = Trainer(
        backbone, train, val, train_cfg, DistContext(device=torch.device(cfg.device)), log=_log,
        calibration_set=calibration,
    )  # fmt: skip
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    lpt_set, phase1_set = result.prompt_set, result.phase1_prompt_set
    probe_params = probe.weight.numel() + probe.bias.numel()
    rows = [
        (
            "linear probe (frozen features)",
            {**summary(probe_report), "params": probe_params, "bytes": 4 * probe_params, "calibration": probe_cal},
        ),
        (
            "logit-adjusted linear probe (frozen features)",
            {
                **summary(la_report),
                "params": la_probe.weight.numel(),
                "bytes": 4 * la_probe.weight.numel(),
                "calibration": la_cal,
            },
        ),
        (
            "phase 1: shared prompt (deep VPT)",
            {
                **summary(result.report["phase1"]),
                "params": phase1_set.num_params,
                "bytes": len(encode(phase1_set)),
                "calibration": _without_bins(result.report["phase1"].get("calibration")),
            },
        ),
        (
            "LPT: phase 1 + phase 2",
            {
                **summary(result.report),
                "params": lpt_set.num_params,
                "bytes": len(encode(lpt_set)),
                "calibration": _without_bins(result.report["calibration"]),
            },
        ),
    ]
    served = _served(backbone, lpt_set, val, result.report, cfg.device) if cfg.served else None
    seconds = {"probe": round(probe_s, 1), "train_and_eval": round(train_s, 1)}
    fine_tuned, serving = None, None
    if cfg.finetune:
        t0 = time.perf_counter()
        fine_tuned, ft_row = _fine_tune(cfg, backbone, train, val, calibration)
        rows.insert(2, ("full fine-tuning, logit-adjusted loss (every weight)", ft_row))
        seconds["finetune"] = round(time.perf_counter() - t0, 1)
    if fine_tuned is not None and cfg.serving_tasks > 0:
        t0 = time.perf_counter()
        batch = torch.stack([val[i][0] for i in range(min(cfg.serving_batch, len(val)))])
        serving = serving_throughput(
            backbone, lpt_set, fine_tuned, batch, cfg.serving_tasks, cfg.serving_batches, cfg.device, cfg.seed
        )
        seconds["serving"] = round(time.perf_counter() - t0, 1)
    return {
        "rows": rows,
        "table": table(rows),
        "served": served,
        "serving": serving,
        "serving_table": serving_table(serving) if serving else None,
        "settings": asdict(cfg),
        "train_counts": counts,
        "test_images": len(val),
        "lr": train_cfg.base_lr,
        "seconds": seconds,
        "phase2": result.report.get("phase2"),
        "warnings": result.report.get("warnings", []),
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _calibrated(
    evaluation: tuple[torch.Tensor, torch.Tensor],
    train_counts: list[int],
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """A temperature fitted on ``calibration`` (else on the evaluation images, the trainer's default) and the
    evaluation's scores before and after."""
    data = "the evaluation set" if calibration is None else "the calibration set"
    return _without_bins(calibration_report(calibration or evaluation, evaluation, train_counts, data))


def _after_first(dataset, skip: int, keep: int):
    """Per class, the ``keep`` images that follow its first ``skip`` (disjoint from ``per_class_subset(skip)``)."""
    seen: dict[int, int] = {}
    indices = []
    for i, t in enumerate(dataset.targets):
        seen[t] = seen.get(t, 0) + 1
        if skip < seen[t] <= skip + keep:
            indices.append(i)
    return dataset.subset(indices)


def _without_bins(calibration: dict[str, Any] | None) -> dict[str, Any] | None:
    """A calibration report without its reliability-diagram rows (the table reads the rest)."""
    return None if calibration is None else {k: v for k, v in calibration.items() if k != "reliability"}


def _served(backbone, ps, val, report: dict[str, Any], device: str) -> dict[str, Any]:
    """The service's scores of the test images (JPEG bytes -> decoder -> engine): ECE with the set's temperature
    and without one, and top-1 against the trainer's report."""
    targets = torch.tensor(val.targets)
    calibrated = served_scores(backbone, ps, val, device)
    uncalibrated = served_scores(backbone, dataclasses.replace(ps, temperature=None), val, device)
    top1 = 100.0 * float((calibrated.argmax(1) == targets).double().mean())
    out = {
        "temperature": ps.score_temperature,
        "images": len(val),
        "ece": ece(calibrated, targets),
        "ece_uncalibrated": ece(uncalibrated, targets),
        "top1": top1,
        "trainer_top1": report["overall"],
        "top1_unchanged": bool(torch.equal(calibrated.argmax(1), uncalibrated.argmax(1))),
    }
    _log(
        f"served: ECE {100 * out['ece']:.2f}% (uncalibrated {100 * out['ece_uncalibrated']:.2f}%), top-1 "
        f"{top1:.2f}% (trainer {report['overall']:.2f}%)"
    )
    return out


def _fine_tune(cfg: AccuracyConfig, backbone, train, val, calibration) -> tuple[Any, dict[str, Any]]:
    """Full fine-tuning on the trainer's budget; its table row (top-1, calibration, size)."""
    counts, names = train.class_counts(), train.class_names
    model = fine_tune(
        backbone,
        train,
        epochs=cfg.epochs1 + cfg.epochs2,
        steps_per_epoch=steps_per_epoch(len(train), cfg.batch_size),
        images_per_step=2 * cfg.batch_size,
        lr=cfg.finetune_lr,
        weight_decay=cfg.finetune_weight_decay,
        min_crop_scale=cfg.min_crop_scale,
        seed=cfg.seed,
        device=cfg.device,
        log=_log,
    )
    val.transform = backbone.eval_transform
    evaluated = evaluate_logits(model, val, len(names), cfg.device)
    report = accuracy_report(evaluated, counts, names)
    held_out = None
    if calibration is not None:
        calibration.transform = backbone.eval_transform
        fitted_on = evaluate_logits(model, calibration, len(names), cfg.device)
        held_out = (fitted_on.logits, fitted_on.logit_targets)
    row = {
        **summary(report),
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": model.nbytes,
        "calibration": _calibrated((evaluated.logits, evaluated.logit_targets), counts, held_out),
    }
    _log(f"[fine-tune] top-1 {report['overall']:.2f}%")
    return model, row


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
- Full fine-tuning: every weight of a copy of the backbone plus a linear head, logit-adjusted cross-entropy,
  SGD (momentum 0.9, lr {s["finetune_lr"]:g}, weight decay {s["finetune_weight_decay"]:g}, one warm-up epoch, cosine),
  {s["epochs1"] + s["epochs2"]} epochs of the trainer's steps with 2 x B images each, the trainer's augmentation.
- ECE: top-1 confidence, 15 equal-width bins, on the evaluated test images; "calibrated" divides the logits by
  one temperature T per method, fitted by NLL on {
        "the same images (the trainer's default, `--val`)"
        if not s.get("calibration_per_class")
        else f"{s['calibration_per_class']} further test images per class, disjoint from the evaluated ones"
    }.
- Served: {_served_line(result.get("served"))}.
- Machine: {result["machine"]}.
- Date: {result["date"]}; wall time (s): {", ".join(f"{k} {v}" for k, v in result["seconds"].items())}.

{result.get("serving_table") or ""}

Command:

```
{command}
```
"""


def _served_line(served: dict[str, Any] | None) -> str:
    if not served:
        return "not measured"
    return (
        f"the test images' JPEG bytes through the service's decoder and engine with T = {served['temperature']:.3f}: "
        f"ECE {100 * served['ece']:.2f}% (T = 1: {100 * served['ece_uncalibrated']:.2f}%), top-1 {served['top1']:.2f}% "
        f"(trainer's report: {served['trainer_top1']:.2f}%)"
    )


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
    if result.get("serving_table"):
        print(result["serving_table"])
    if result.get("served"):
        print(f"served: {_served_line(result['served'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        command = "python -m bench accuracy " + shlex.join(argv if argv is not None else sys.argv[2:])
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(result, command))
    return 0
