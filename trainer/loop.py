"""The LPT training loop: phase 1 (shared prompt + head) then phase 2 (group prompts + keys + head).

Both phases train through ``lpt.forward.prompted_forward``, the forward the service runs, over a
one-slot ``PromptBank`` built from live parameters: what is trained is exactly what is served.

Every step draws a class-balanced and an instance-balanced batch (dual sampling) and runs them as one
forward (rows are independent, so this is exact and halves the number of passes). Step loss at epoch
``e`` of ``E`` (0-based ``e``):

    L = AGCL_cb(x_cb) - 0.5 * sim(x_cb) + max(0, 0.5 * (E - e) / E) * (AGCL_ib(x_ib) - 0.5 * sim(x_ib))

where ``sim`` exists in phase 2 only (phase 1 has no keys). Only prompt tensors train; the backbone
is frozen and never handed to the optimiser.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lpt.backbone import Backbone
from lpt.forward import PromptBank
from lpt.init import init_prompt_set
from lpt.prompt_set import PromptSet
from trainer.calibration import calibration_report, describe_calibration
from trainer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainer.config import DistContext, TrainConfig, TrainResult, deterministic, ib_weight_at, lr_at
from trainer.data import ImageDataset, train_transform
from trainer.evaluate import (
    accuracy_report,
    autocast,
    describe_selection,
    evaluate,
    prompt_predictor,
    selection_report,
    summary,
)
from trainer.guards import chance_warning, collapse_warning, mean_pairwise_cosine
from trainer.losses import AGCL, CB_GAMMAS, IB_GAMMAS
from trainer.prompt_init import HEAD_INITS, PROMPT_INITS, initial_group_prompts, initial_params
from trainer.prompt_module import PromptModule
from trainer.samplers import dual_sampling_loaders, stream_seed

PHASE_PARAMS = {1: ("shared_prompt", "head_weight"), 2: ("group_prompts", "group_keys", "head_weight")}


class Trainer:
    """Runs both phases, evaluates, checkpoints, and builds the prompt sets.

    Args:
        backbone: frozen backbone (moved to ``ctx.device``).
        train_set: long-tailed training data (its transform is replaced by the train augmentation).
        val_set: evaluation data with the training set's class indices (its transform: the backbone's eval one).
        config: hyper-parameters.
        ctx: data-parallel context.
        checkpoint: where to save after every epoch (rank 0); ``None`` saves nothing.
        log: receives one line per epoch and phase (rank 0).
        calibration_set: held-out data the temperature of each prompt set is fitted on (its transform: the
            backbone's eval one); ``None``: ``val_set``.
    """

    def __init__(
        self,
        backbone: Backbone,
        train_set: ImageDataset,
        val_set: ImageDataset,
        config: TrainConfig,
        ctx: DistContext | None = None,
        checkpoint: str | Path | None = None,
        log: Callable[[str], None] = print,
        calibration_set: ImageDataset | None = None,
    ):
        self.backbone = backbone
        self.cfg = config
        self.ctx = ctx or DistContext()
        self.checkpoint_path = Path(checkpoint) if checkpoint else None
        self.log = log if self.ctx.is_main else (lambda _msg: None)
        self.train_set = train_set
        self.train_set.transform = train_transform(backbone.info.data_config, config.min_crop_scale)
        self.val_set = val_set
        self.val_set.transform = backbone.eval_transform
        self.calibration_set = calibration_set
        if calibration_set is not None:
            calibration_set.transform = backbone.eval_transform
        if config.prompt_init not in PROMPT_INITS:
            raise ValueError(f"prompt_init must be one of {PROMPT_INITS}, got {config.prompt_init!r}")
        if config.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {config.head_init!r}")
        self.class_names = list(train_set.class_names)
        self.class_counts = train_set.class_counts()
        if min(self.class_counts) < 1:
            empty = [n for n, c in zip(self.class_names, self.class_counts, strict=True) if c < 1]
            raise ValueError(f"classes without training images: {empty[:5]}")
        self.template = init_prompt_set(
            backbone.info,
            self.class_names,
            prompt_length=config.prompt_length,
            pool_size=config.pool_size,
            share_blocks=config.share_blocks,
            top_k=config.top_k,
            head_scale=config.head_scale,
            seed=config.seed,
            style="vpt" if config.prompt_init == "vpt" else "normal",
        )
        self.per_rank_batch = max(1, config.batch_size // self.ctx.world)
        self.steps = config.steps_per_epoch or max(1, math.ceil(len(train_set) / config.batch_size))
        loss_args = dict(
            class_counts=tuple(self.class_counts),
            scale=config.head_scale,
            margin=config.margin,
            noise_mul=config.noise_mul,
            eps=config.label_smoothing,
        )
        self.loss_cb = AGCL(gamma_pos=CB_GAMMAS[0], gamma_neg=CB_GAMMAS[1], **loss_args)
        self.loss_ib = AGCL(gamma_pos=IB_GAMMAS[0], gamma_neg=IB_GAMMAS[1], **loss_args)

    # ----------------------------------------------------------------------------------------- state
    @property
    def has_pool(self) -> bool:
        return self.template.pool_size > 0 and self.cfg.epochs2 > 0

    def _fresh_checkpoint(self) -> Checkpoint:
        params, features = initial_params(self.backbone, self.train_set, self.template, self.cfg, self.ctx.device)
        state: dict[str, Any] = {"history": [], "phase1": None, "warnings": []}
        self._check_collapse(features, state)
        return Checkpoint(params=params, state=state)

    def _warn(self, state: dict[str, Any], message: str) -> None:
        state.setdefault("warnings", []).append(message)
        self.log(f"WARNING: {message}")

    def _check_collapse(self, features: torch.Tensor, state: dict[str, Any]) -> None:
        state["start_feature_cosine"] = mean_cos = mean_pairwise_cosine(features)
        if message := collapse_warning(mean_cos):
            self._warn(state, message)

    def _check_learning(self, ckpt: Checkpoint, row: dict[str, Any]) -> None:
        if message := chance_warning(row, len(self.class_names)):
            self._warn(ckpt.state, message)

    def _init_pool(self, ckpt: Checkpoint) -> None:
        shared = ckpt.params["shared_prompt"]
        pool = initial_group_prompts(self.backbone, self.train_set, self.template, shared, self.cfg, self.ctx.device)
        if pool is not None:
            ckpt.params["group_prompts"] = pool

    def _settings(self) -> dict[str, Any]:
        return {
            "config": self.cfg.resume_key(),
            "class_names": self.class_names,
            "class_counts": self.class_counts,
            "backbone_fingerprint": self.backbone.info.fingerprint,
            "world_size": self.ctx.world,
        }

    def _load_or_init(self, resume: bool) -> Checkpoint:
        path = self.checkpoint_path
        if not (resume and path and path.exists()):
            return self._fresh_checkpoint()
        ckpt = load_checkpoint(path)
        saved, now = ckpt.state.get("settings"), self._settings()
        if saved != now:
            diff = sorted(k for k in now if saved is None or saved.get(k) != now[k])
            raise ValueError(f"checkpoint {path} was written for other settings ({', '.join(diff)}); not resuming")
        self.log(f"resuming from {path}: phase {ckpt.phase}, {ckpt.epoch} epoch(s) done")
        return ckpt

    def _save(self, ckpt: Checkpoint) -> None:
        if self.checkpoint_path and self.ctx.is_main:
            ckpt.state["settings"] = self._settings()
            save_checkpoint(self.checkpoint_path, ckpt)
        self.ctx.barrier()

    # ------------------------------------------------------------------------------------------- run
    def fit(self, resume: bool = False, stop_after_epochs: int | None = None) -> TrainResult:
        """Train both phases (from the checkpoint when ``resume``) and evaluate.

        Args:
            resume: continue from ``checkpoint`` if it exists.
            stop_after_epochs: stop (checkpointed, ``finished=False``) after this many epochs in this call.
        """
        with deterministic(self.ctx.device.type == "cpu"):
            return self._fit(resume, stop_after_epochs)

    def _fit(self, resume: bool, stop_after_epochs: int | None) -> TrainResult:
        self.backbone.model.to(self.ctx.device)
        ckpt = self._load_or_init(resume)
        budget = [stop_after_epochs if stop_after_epochs is not None else math.inf]
        if ckpt.phase == 1:
            if not self._run_phase(ckpt, 1, self.cfg.epochs1, budget):
                return TrainResult(finished=False)
            phase1 = self._evaluate(ckpt.params, with_pool=False, what="phase 1")
            phase1.pop("predictions")
            phase1.pop("selection")
            phase1["calibration"] = self._calibrate(ckpt.params, False, phase1.pop("logits"), "phase 1")
            ckpt.state["phase1"] = phase1
            ckpt.phase, ckpt.epoch, ckpt.momentum = (2 if self.has_pool else 3), 0, {}
            if self.has_pool:
                self._init_pool(ckpt)
            self._save(ckpt)
        if ckpt.phase == 2:
            if not self._run_phase(ckpt, 2, self.cfg.epochs2, budget):
                return TrainResult(finished=False)
            ckpt.phase, ckpt.epoch, ckpt.momentum = 3, 0, {}
            self._save(ckpt)
        final = self._evaluate(ckpt.params, with_pool=self.has_pool, what="final")
        predictions = final.pop("predictions")
        selection = final.pop("selection")
        calibration = self._calibrate(ckpt.params, self.has_pool, final.pop("logits"), "final")
        phase2 = None
        if self.has_pool and selection is not None:
            phase2 = selection_report(
                selection,
                self.template.pool_size,
                self.class_counts,
                self.template.group_keys,
                ckpt.params["group_keys"],
            )
            self.log(f"[phase 2] {describe_selection(phase2)}")
        report = {
            **summary(final),
            "phase1": ckpt.state["phase1"],
            "per_class": final["per_class"],
            "history": ckpt.state["history"],
            "phase2": phase2,
            "calibration": calibration,
            "warnings": ckpt.state.get("warnings", []),
            "start_feature_cosine": ckpt.state.get("start_feature_cosine"),
            "train": {"images": len(self.train_set), "class_counts": self.class_counts},
            "val": {"images": len(self.val_set)},
        }
        phase1_temperature = (ckpt.state["phase1"].get("calibration") or {}).get("temperature")
        return TrainResult(
            finished=True,
            prompt_set=self.prompt_set(ckpt.params, self.has_pool, calibration["temperature"]),
            phase1_prompt_set=self.prompt_set(ckpt.params, False, phase1_temperature),
            report=report,
            predictions=predictions,
        )

    def prompt_set(
        self, params: dict[str, torch.Tensor], with_pool: bool, temperature: float | None = None
    ) -> PromptSet:
        """A servable prompt set from the parameters (pool dropped for the phase-1 / deep-VPT set).

        Args:
            params: the trained tensors.
            with_pool: keep the group-prompt pool (phase 2's set).
            temperature: the set's fitted temperature (``None``: an uncalibrated set).
        """
        t = self.template
        return PromptSet(
            shared_prompt=params["shared_prompt"].detach().cpu().float().contiguous(),
            head_weight=params["head_weight"].detach().cpu().float().contiguous(),
            class_names=self.class_names,
            backbone=self.backbone.info.name,
            backbone_fingerprint=self.backbone.info.fingerprint,
            backbone_input_size=self.backbone.info.input_size,
            share_blocks=t.share_blocks,
            top_k=t.top_k if with_pool else 1,
            head_scale=t.head_scale,
            group_prompts=params["group_prompts"].detach().cpu().float().contiguous() if with_pool else None,
            group_keys=params["group_keys"].detach().cpu().float().contiguous() if with_pool else None,
            temperature=temperature,
        )

    def _counts(self, params: dict[str, torch.Tensor], with_pool: bool, dataset: ImageDataset):
        """The served forward of the parameters' prompt set over ``dataset``: counts, selections and logits."""
        bank = PromptBank.stack([self.prompt_set(params, with_pool)], device=self.ctx.device)
        return evaluate(
            prompt_predictor(self.backbone.model, bank),
            dataset,
            len(self.class_names),
            self.ctx.device,
            batch_size=self.cfg.eval_batch_size,
            workers=self.cfg.workers,
            amp=self.cfg.amp,
            progress=self.cfg.progress and self.ctx.is_main,
            keep_logits=True,
        )

    def _calibrate(
        self, params: dict[str, torch.Tensor], with_pool: bool, evaluation: tuple[torch.Tensor, torch.Tensor], what: str
    ) -> dict[str, Any]:
        """Fit the set's temperature (on the calibration set, else the evaluation set) and report both scores."""
        if self.calibration_set is None:
            fitted_on, data = evaluation, "the evaluation set"
        else:
            counts = self._counts(params, with_pool, self.calibration_set)
            fitted_on, data = (counts.logits, counts.logit_targets), "the calibration set"
        report = calibration_report(fitted_on, evaluation, self.class_counts, data)
        self.log(f"[{what}] {describe_calibration(report)}")
        return report

    def _evaluate(self, params: dict[str, torch.Tensor], with_pool: bool, what: str) -> dict[str, Any]:
        counts = self._counts(params, with_pool, self.val_set)
        report = accuracy_report(counts, self.class_counts, self.class_names)
        report["predictions"] = counts.predictions
        report["selection"] = counts.selection
        report["logits"] = (counts.logits, counts.logit_targets)
        groups = " ".join(f"{g} {report[g]:.2f}" for g in ("many", "medium", "few") if report[g] is not None)
        self.log(f"[{what}] top-1 {report['overall']:.2f}% ({groups})")
        return report

    # ----------------------------------------------------------------------------------------- phases
    def _run_phase(self, ckpt: Checkpoint, phase: int, epochs: int, budget: list[float]) -> bool:
        """Train ``phase`` from ``ckpt.epoch`` to ``epochs``; False when the epoch budget ran out first."""
        trainable = PHASE_PARAMS[phase]
        device = self.ctx.device
        module = PromptModule(
            self.backbone.model,
            {k: v.to(device) for k, v in ckpt.params.items()},
            trainable,
            self.template.share_blocks,
            self.template.top_k,
            self.template.head_scale,
            head_dropout=self.cfg.head_dropout,
        )
        cfg = self.cfg
        optimizer = torch.optim.SGD(
            module.prompts.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        for name, buf in ckpt.momentum.items():
            optimizer.state[module.prompts[name]]["momentum_buffer"] = buf.to(device)
        runner: nn.Module = module
        if self.ctx.world > 1:
            runner = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None
            )
        while ckpt.epoch < epochs:
            if budget[0] <= 0:
                return False
            stats = self._run_epoch(runner, module, optimizer, phase, ckpt.epoch, epochs)
            ckpt.epoch += 1
            ckpt.params = {k: v.to("cpu") for k, v in module.all_tensors().items()}
            ckpt.momentum = {
                name: optimizer.state[p]["momentum_buffer"].detach().to("cpu")
                for name, p in module.prompts.items()
                if "momentum_buffer" in optimizer.state[p]
            }
            ckpt.state["history"].append(stats)
            self._check_learning(ckpt, stats)
            self._save(ckpt)
            budget[0] -= 1
        return True

    def _run_epoch(
        self,
        runner: nn.Module,
        module: PromptModule,
        optimizer: torch.optim.Optimizer,
        phase: int,
        epoch: int,
        epochs: int,
    ) -> dict[str, Any]:
        cfg, device, rank = self.cfg, self.ctx.device, self.ctx.rank
        # Augmentation (workers=0) and A-GCL noise are seeded per (phase, epoch, rank): a run resumed at an
        # epoch boundary replays exactly what the uninterrupted run would have done.
        torch.manual_seed(stream_seed(cfg.seed, phase, epoch, rank, 20))
        noise_gen = torch.Generator().manual_seed(stream_seed(cfg.seed, phase, epoch, rank, 30))
        cb_loader, ib_loader = dual_sampling_loaders(
            self.train_set,
            self.per_rank_batch,
            self.steps,
            seed=cfg.seed,
            rank=rank,
            phase=phase,
            epoch=epoch,
            images_per_class=cfg.images_per_class,
            workers=cfg.workers,
            pin_memory=device.type == "cuda",
        )
        w_ib = ib_weight_at(epoch, epochs, cfg.ib_weight)
        with_pool = phase == 2
        warmup = cfg.warmup_epochs * self.steps
        total_loss = torch.zeros((), dtype=torch.float64)
        correct = seen = 0
        start = time.perf_counter()
        steps = zip(cb_loader, ib_loader, strict=True)
        bar = self._bar(steps, f"phase {phase} epoch {epoch + 1}/{epochs}")
        lr = cfg.warmup_lr
        for step, ((x_cb, y_cb), (x_ib, y_ib)) in enumerate(bar):
            lr = lr_at(epoch * self.steps + step, epochs * self.steps, warmup, cfg.base_lr, cfg.warmup_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = torch.cat([x_cb, x_ib]).to(device, non_blocking=True)
            labels = torch.cat([y_cb, y_ib]).to(device)
            with autocast(device, cfg.amp):
                logits, key_sim = runner(images, with_pool)
            loss = self._step_loss(logits.float(), key_sim.float(), labels, len(y_cb), w_ib, noise_gen, with_pool)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at phase {phase} epoch {epoch + 1} step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach().double().cpu()
            correct += int((logits.detach().argmax(1) == labels).sum())
            seen += len(labels)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
        stats = self._epoch_stats(total_loss, correct, seen)
        row = {
            "phase": phase,
            "epoch": epoch + 1,
            "loss": stats[0],
            "train_acc": stats[1],
            "lr": lr,
            "ib_weight": w_ib,
            "seconds": round(time.perf_counter() - start, 3),
        }
        row["global_epoch"] = epoch + 1 + (cfg.epochs1 if phase == 2 else 0)
        self.log(
            f"phase {phase} epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f} batch top-1 {row['train_acc']:.1f}% "
            f"lr {lr:.2e} ib-weight {w_ib:.3f} ({row['seconds']:.1f}s)"
        )
        return row

    def _step_loss(
        self,
        logits: torch.Tensor,
        key_sim: torch.Tensor,
        labels: torch.Tensor,
        n_cb: int,
        w_ib: float,
        noise_gen: torch.Generator,
        with_pool: bool,
    ) -> torch.Tensor:
        """``AGCL_cb - sim_w * sim_cb + w_ib * (AGCL_ib - sim_w * sim_ib)`` over the two halves of the batch."""
        cosine = logits / self.template.head_scale  # A-GCL works on the cosine logits in [-1, 1]
        loss_cb = self.loss_cb(cosine[:n_cb], labels[:n_cb], generator=noise_gen)
        loss_ib = self.loss_ib(cosine[n_cb:], labels[n_cb:], generator=noise_gen)
        if with_pool:
            loss_cb = loss_cb - self.cfg.sim_weight * key_sim[:n_cb].mean()
            loss_ib = loss_ib - self.cfg.sim_weight * key_sim[n_cb:].mean()
        return loss_cb + w_ib * loss_ib

    def _epoch_stats(self, total_loss: torch.Tensor, correct: int, seen: int) -> tuple[float, float]:
        packed = torch.tensor([float(total_loss), correct, seen], dtype=torch.float64)
        if self.ctx.world > 1:
            dist.all_reduce(packed)
            packed[0] /= self.ctx.world
        return float(packed[0]) / self.steps, 100.0 * float(packed[1]) / max(1.0, float(packed[2]))

    def _bar(self, iterable, desc: str):
        if not (self.cfg.progress and self.ctx.is_main):
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, total=self.steps, desc=desc, leave=False, dynamic_ncols=True)
