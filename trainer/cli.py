"""``lpt-train``: train an LPT prompt set on a long-tailed image set and write (and optionally push) it.

Run under ``torchrun --nproc_per_node N -m trainer.cli ...`` for data-parallel training (NCCL on CUDA,
gloo on CPU). Every ``TrainConfig`` field is a flag, generated from the field (type, help, default); the run's
own options (data, backbone, outputs, upload) are declared in ``build_parser``. Every flag may also come from
``--config FILE`` (JSON or YAML, same keys with dashes or underscores); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.distributed as dist

from lpt import __version__
from lpt.backbone import describe_mismatch, load_backbone
from lpt.errors import LptError
from lpt.options import flag_name, without_none
from lpt.prompt_set import encode, sha256, validate
from trainer.config import DistContext, TrainConfig
from trainer.data import DATA_FORMATS, DataError, load_dataset, long_tailed_subset, per_class_subset
from trainer.evaluate import INSTALL_TRAIN_EXTRA, plot_report, summary
from trainer.loop import Trainer
from trainer.options import FIELD_TYPES, add_field_flags, config_defaults, load_config_file

log = logging.getLogger("lpt-train")
REQUIRED = ("train", "val", "backbone", "backbone_weights", "out", "report")
PAPER_BACKBONE = "vit_base_patch16_224.augreg_in21k"


def build_parser() -> argparse.ArgumentParser:
    """The run's own flags (data, backbone, outputs, upload) and one flag per ``TrainConfig`` field."""
    p = argparse.ArgumentParser(
        prog="lpt-train",
        description="Train an LPT prompt set (phase 1: shared prompt; phase 2: group prompt pool) on a frozen ViT. "
        f"Required, as flags or in --config: {', '.join(flag_name(k) for k in REQUIRED)}. Every flag is also a "
        "--config key (dashes or underscores).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    io = p.add_argument_group("data and output")
    io.add_argument("--config", help="JSON or YAML file with any of these options (flags override it)")
    io.add_argument(
        "--train",
        help="[required] training data: folder, list file, archive.zip/inner/folder, CIFAR root, synthetic:C:N:IR",
    )
    io.add_argument("--val", help="[required] evaluation data (same forms as --train)")
    io.add_argument(
        "--calibration-data",
        help="held-out data each prompt set's score temperature is fitted on (same forms as --val; read with "
        "--val-data-root; default: the --val set)",
    )
    io.add_argument("--data-format", choices=DATA_FORMATS, default="auto", help="how to read --train/--val")
    io.add_argument("--data-root", help="image root for list files (default: the list file's folder)")
    io.add_argument("--val-data-root", help="image root for the --val list file (default: --data-root)")
    io.add_argument("--cifar-lt", type=int, choices=(10, 100), help="--train/--val are torchvision CIFAR-10/100 roots")
    io.add_argument("--imbalance-ratio", type=float, help="cut a long-tailed subset from --train (CIFAR-LT: 100)")
    io.add_argument("--max-per-class", type=int, help="n_max of the long-tailed cut (default: smallest class size)")
    io.add_argument("--val-max-per-class", type=int, help="evaluate on at most this many images per class")
    io.add_argument("--out", help="[required] output prompt set (.safetensors, lpt-prompt-set/1)")
    io.add_argument("--report", help="[required] output evaluation report (.json)")
    io.add_argument("--plot", help="output PNG: training curves and per-class accuracy vs training count")
    io.add_argument(
        "--checkpoint", help="checkpoint file (default: OUT with its suffix replaced, e.g. my-task.ckpt.safetensors)"
    )
    io.add_argument("--resume", nargs="?", const="auto", help="resume from the checkpoint (or this file) if present")

    model = p.add_argument_group("backbone")
    model.add_argument("--backbone", help=f"[required] timm ViT name (paper: {PAPER_BACKBONE})")
    model.add_argument(
        "--backbone-weights", help="[required] hub (timm's pretrained weights) | PATH (local file) | random:SEED"
    )
    model.add_argument("--img-size", type=int, help="build the backbone for this input size")

    add_field_flags(p.add_argument_group("training settings (TrainConfig)"))

    run = p.add_argument_group("execution")
    run.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    run.add_argument("--stop-after-epochs", type=int, help=argparse.SUPPRESS)  # tests: simulate an interruption

    push = p.add_argument_group("upload")
    push.add_argument("--push", metavar="URL", help="upload the prompt set to a running lpt-serve")
    push.add_argument("--task", help="task id for --push")
    push.add_argument("--api-key", help="API key for --push (default: $LPT_API_KEY)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags over ``--config`` over the defaults, then the checks that need every value."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        try:
            parser.set_defaults(**config_defaults(parser, load_config_file(first.config)))
        except ValueError as exc:
            parser.error(f"{first.config}: {exc}")
    args = parser.parse_args(argv)
    missing = [flag_name(k) for k in REQUIRED if getattr(args, k) in (None, "")]
    if missing:
        parser.error(f"required (as flags or in --config): {', '.join(missing)}")
    if args.push and not args.task:
        parser.error("--push needs --task")
    if problems := missing_train_extra(args):
        parser.error("; ".join(problems))
    return args


def missing_train_extra(args: argparse.Namespace) -> list[str]:
    """What this run needs from the ``train`` extra and lacks; checked before training, not when plotting."""
    wanted = [("matplotlib", "--plot")] if args.plot else []
    if args.progress:
        wanted.append(("tqdm", "progress bars (--no-progress turns them off)"))
    return [
        f"{purpose} needs {module}: {INSTALL_TRAIN_EXTRA}"
        for module, purpose in wanted
        if importlib.util.find_spec(module) is None
    ]


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed arguments: one value per field, tuples where the field is a tuple."""
    values = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name)
        kind, _ = without_none(FIELD_TYPES[f.name])
        values[f.name] = tuple(value) if typing.get_origin(kind) is tuple and value is not None else value
    return TrainConfig(**values)


def options_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """Every flag of ``lpt-train`` as a Markdown table, one section per group (docs/trainer.md holds it)."""
    parser = parser or build_parser()
    formatter = parser._get_formatter()
    lines = ["| flag | meaning |", "|---|---|"]
    for group in parser._action_groups:
        shown = [a for a in group._group_actions if a.help not in (None, argparse.SUPPRESS) and a.dest != "help"]
        if not shown:
            continue
        lines.append(f"| **{group.title}** | |")
        for action in shown:
            invocation = formatter._format_action_invocation(action)
            meaning = (action.help % {"prog": parser.prog}).replace("|", "\\|")
            lines.append(f"| `{invocation}` | {meaning} |")
    return "\n".join(lines) + "\n"


def setup_distributed(device_arg: str | None) -> DistContext:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg.startswith("cuda") if device_arg else torch.cuda.is_available()
    if world <= 1:
        return DistContext(device=torch.device(device_arg or ("cuda" if want_cuda else "cpu")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if want_cuda else "gloo")
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def load_data(args: argparse.Namespace, img_size: int):
    """The training set (long-tailed cut when asked), the evaluation set and the calibration set (or ``None``)."""
    train = load_dataset(args.train, "train", args.data_format, args.data_root, args.cifar_lt, img_size)
    val_root = args.val_data_root or args.data_root
    val = load_dataset(args.val, "val", args.data_format, val_root, args.cifar_lt, img_size)
    calibration = None
    if args.calibration_data:
        calibration = load_dataset(args.calibration_data, "val", args.data_format, val_root, args.cifar_lt, img_size)
        calibration = calibration.with_classes(train.class_names)
    ratio = args.imbalance_ratio or (100.0 if args.cifar_lt else None)
    if ratio:
        train = long_tailed_subset(train, ratio, args.max_per_class)
    elif args.max_per_class:
        train = per_class_subset(train, args.max_per_class)
    if args.val_max_per_class:
        val = per_class_subset(val, args.val_max_per_class)
    return train, val.with_classes(train.class_names), calibration


def metadata(args: argparse.Namespace, cfg: TrainConfig, report: dict[str, Any]) -> dict[str, str]:
    """The prompt set's extra metadata: the evaluation and how it was trained."""
    evaluation = {
        **summary(report),
        "phase1": summary(report["phase1"]),
        "val_images": report["val"]["images"],
        "calibration": calibration_summary(report["calibration"]),
    }
    trained = {
        "train_images": report["train"]["images"],
        "class_counts": report["train"]["class_counts"],
        "config": cfg.resume_key(),
        "img_size": args.img_size,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return {"evaluation": json.dumps(evaluation), "training": json.dumps(trained)}


def calibration_summary(calibration: dict[str, Any]) -> dict[str, Any]:
    """The temperature, where it was fitted and the overall ECE / NLL before and after (prompt-set metadata)."""
    keys = ("temperature", "data", "source", "images")
    out: dict[str, Any] = {k: calibration[k] for k in keys if k in calibration}
    for when in ("before", "after"):
        out[when] = {k: calibration[when]["overall"][k] for k in ("ece", "nll")}
    return out


class PushTargetError(Exception):
    """The ``--push`` service cannot take this run's prompt set (found before training)."""


def check_push_target(url: str, api_key: str | None, local: dict[str, Any]) -> None:
    """Before training: the service answers, accepts the key, and runs this run's backbone.

    Raises:
        PushTargetError: in plain words, naming what to change.
    """
    from lpt.client import ApiError, LptClient  # imported late: only --push needs the HTTP client

    try:
        with LptClient(url, api_key=api_key, timeout=10.0) as client:
            remote = client.backbone()
            client.tasks()  # an authenticated call: a wrong or missing key fails here, not after training
    except ApiError as exc:
        raise PushTargetError(f"--push {url}: the service refused ({exc.status} {exc.code}: {exc})") from None
    except httpx.HTTPError as exc:
        raise PushTargetError(
            f"--push {url}: the service does not answer ({exc}); is lpt-serve running there?"
        ) from None
    if problem := describe_mismatch(remote, local, "the service runs", "this run trains for"):
        raise PushTargetError(
            f"--push {url}: {problem}. Train with the service's --backbone, --backbone-weights and --img-size "
            f"(GET {url.rstrip('/')}/v1/backbone shows them)"
        )


def push(url: str, task: str, api_key: str | None, data: bytes) -> dict[str, Any]:
    from lpt.client import LptClient  # imported late: only --push needs the HTTP client

    return LptClient(url, api_key=api_key).push_prompt_set(task, data)


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("LPT_API_KEY")


def run(args: argparse.Namespace) -> int:
    ctx = setup_distributed(args.device)
    try:
        backbone = load_backbone(args.backbone, args.backbone_weights, args.img_size)
        if args.push and ctx.is_main:
            check_push_target(args.push, api_key(args), backbone.info.to_dict())
        train, val, calibration = load_data(args, backbone.info.input_size[-1])
        cfg = train_config(args)
        checkpoint = args.checkpoint or str(Path(args.out).with_suffix(".ckpt.safetensors"))
        if args.resume not in (None, "auto"):
            checkpoint = args.resume
        log.info("training on %d images in %d classes, evaluating on %d", len(train), len(train.class_names), len(val))
        trainer = Trainer(
            backbone, train, val, cfg, ctx, checkpoint=checkpoint, log=log.info, calibration_set=calibration
        )
        result = trainer.fit(resume=args.resume is not None, stop_after_epochs=args.stop_after_epochs)
        if not result.finished:
            log.info("stopped early; resume with --resume (checkpoint %s)", checkpoint)
            return 0
        if ctx.is_main:
            write_outputs(args, cfg, backbone.info, result)
        return 0
    finally:
        if ctx.world > 1:
            dist.destroy_process_group()


def write_outputs(args: argparse.Namespace, cfg: TrainConfig, info, result) -> None:
    source = args.calibration_data or args.val
    for calibration in (result.report["calibration"], result.report["phase1"].get("calibration")):
        if calibration is not None:
            calibration["source"] = f"{'--calibration-data' if args.calibration_data else '--val'} {source}"
    ps = result.prompt_set
    ps.extra = metadata(args, cfg, result.report)
    validate(ps, info)  # never write a file the service would reject
    data = encode(ps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    report = {**result.report, "backbone": info.to_dict(), "prompt_set": {"path": str(out), "sha256": sha256(data)}}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=1))
    log.info("wrote %s (%d bytes, %d params) and %s", out, len(data), ps.num_params, args.report)
    if args.plot:
        log.info("wrote %s", plot_report(report, args.plot))
    if args.push:
        answer = push(args.push, args.task, api_key(args), data)
        log.info("pushed to %s task %s: %s", args.push, args.task, answer)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except (LptError, DataError, PushTargetError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
