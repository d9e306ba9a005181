"""What a user would pick instead of a prompt set per task, measured on the accuracy benchmark's split and budget.

- ``fine_tune``: the whole backbone plus a linear head trained per task (every weight), with the same augmentation
  and the same number of epochs, steps and images per step as the prompt trainer, and the logit-adjusted loss
  (Menon et al. 2021: cross-entropy on ``logits + log prior``; prediction on the logits alone).
- ``served_scores``: a prompt set's scores as the service computes them (its image decoder, its engine, the set's
  temperature), for the test images' own JPEG bytes.
- ``serving_throughput``: images per second of one process serving N tasks, each batch's rows spread over random
  tasks: N prompt sets on one shared backbone (one forward per batch) against one fine-tuned model per task (a
  batch splits into one forward per task present), with the same batches, device, dtype and inference mode.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from lpt.backbone import Backbone
from lpt.forward import autocast, embed, pool_features
from lpt.prompt_set import PromptSet
from prompts_store.base import StoredVersion
from service.engine import Engine
from service.images import ImageDecoder
from service.resident import make_resident
from trainer.config import lr_at
from trainer.data import ImageDataset, ZipSource, train_transform
from trainer.evaluate import EvalCounts, evaluate


class FineTuned(nn.Module):
    """A trainable copy of the backbone with a linear head on its pooled feature (the same feature LPT's head reads).

    Args:
        backbone: the frozen backbone to copy.
        num_classes: C.
    """

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.model = copy.deepcopy(backbone.model)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.head = nn.Linear(backbone.info.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(pool_features(self.model, self.model.blocks(embed(self.model, images))))

    @property
    def nbytes(self) -> int:
        """Bytes of every weight a task has to store (float32)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


def fine_tune(
    backbone: Backbone,
    train: ImageDataset,
    epochs: int,
    steps_per_epoch: int,
    images_per_step: int,
    lr: float,
    weight_decay: float,
    min_crop_scale: float,
    seed: int,
    device: torch.device | str,
    log: Callable[[str], None],
) -> FineTuned:
    """Full fine-tuning with the logit-adjusted loss: SGD (momentum 0.9), one warm-up epoch, then cosine.

    Args:
        backbone: the pretrained backbone (copied; the original is untouched).
        train: the long-tailed training set (its transform becomes the prompt trainer's augmentation).
        epochs: epochs (the prompt trainer's two phases together).
        steps_per_epoch: steps per epoch (the prompt trainer's).
        images_per_step: images per step, drawn uniformly over the training images (the prompt trainer's 2 x B).
        lr: peak learning rate.
        weight_decay: SGD weight decay.
        min_crop_scale: RandomResizedCrop's lower area bound.
        seed: seeds the head, the sampling and the augmentation.
        device: where it trains.
        log: receives one line per epoch.
    """
    torch.manual_seed(seed)
    counts = torch.tensor(train.class_counts(), dtype=torch.float64)
    log_prior = (counts / counts.sum()).log().float().to(device)
    model = FineTuned(backbone, len(counts)).to(device).train()
    train.transform = train_transform(backbone.info.data_config, min_crop_scale)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    total = epochs * steps_per_epoch
    sampler = RandomSampler(
        train, replacement=True, num_samples=total * images_per_step, generator=torch.Generator().manual_seed(seed)
    )
    loader = iter(DataLoader(train, batch_size=images_per_step, sampler=sampler))
    for epoch in range(epochs):
        start, running = time.perf_counter(), 0.0
        for step in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + step, total, steps_per_epoch, lr, 1e-6)
            images, labels = next(loader)
            loss = F.cross_entropy(model(images.to(device)) + log_prior, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach())
        log(
            f"fine-tune epoch {epoch + 1}/{epochs}: loss {running / steps_per_epoch:.4f} "
            f"({time.perf_counter() - start:.1f}s)"
        )
    return model.eval()


def evaluate_logits(
    predict: Callable[[torch.Tensor], torch.Tensor], dataset: ImageDataset, num_classes: int, device: torch.device | str
) -> EvalCounts:
    """Top-1 counts and every image's logits of ``predict`` over ``dataset`` (the trainer's evaluation)."""
    return evaluate(predict, dataset, num_classes, torch.device(device), keep_logits=True)


def _stored(task: str) -> StoredVersion:
    """Store metadata naming a resident entry (the engine keys its slots by it)."""
    return StoredVersion("bench", task, 1, hashlib.sha256(task.encode()).hexdigest(), 0, 0.0, {})


def served_scores(
    backbone: Backbone, ps: PromptSet, dataset: ImageDataset, device: torch.device | str, batch: int = 64
) -> torch.Tensor:
    """``[N, C]`` scores of the service for ``dataset``'s images: their encoded bytes through the service's image
    decoder, then its engine with the set resident (temperature applied), in float32.

    Args:
        backbone: the service's backbone.
        ps: the prompt set as uploaded.
        dataset: a zip-backed image set (its bytes are what a client would send).
        device: where the engine runs.
        batch: images per engine call.
    """
    if not isinstance(dataset.source, ZipSource):
        raise TypeError("served_scores reads the images' encoded bytes from a zip-backed dataset")
    decoder = ImageDecoder(backbone.eval_transform, max_bytes=1 << 24, max_pixels=1 << 26)
    engine = Engine(backbone, device, torch.float32)
    entry = make_resident(_stored("served"), ps, device, torch.float32, backbone.model)
    out = []
    with zipfile.ZipFile(dataset.source.archive) as archive:
        members = dataset.source.members
        for first in range(0, len(members), batch):
            images = torch.stack([decoder(archive.read(m)) for m in members[first : first + batch]])
            out.extend(engine.infer(images, [entry] * len(images)))
    return torch.stack(out)


def serving_throughput(
    backbone: Backbone,
    ps: PromptSet,
    fine_tuned: FineTuned,
    images: torch.Tensor,
    tasks: int,
    batches: int,
    device: torch.device | str,
    seed: int = 0,
) -> dict[str, Any]:
    """Images per second serving ``tasks`` tasks: prompt sets on one backbone against one model per task.

    Every batch is ``images`` with each row assigned a random task; both sides see the same batches. The prompt
    side runs the service's engine over ``tasks`` resident copies of ``ps`` (one mixed forward per batch); the
    model side keeps ``tasks`` copies of ``fine_tuned`` and runs each task's rows through its own model.

    Args:
        backbone: the shared backbone.
        ps: the task's prompt set (every task serves a copy).
        fine_tuned: the task's fine-tuned model (every task serves a copy).
        images: ``[B, 3, H, W]`` preprocessed images (one batch).
        tasks: number of tasks served.
        batches: timed batches (after one warm-up batch each).
        device: where both run.
        seed: the rows' task assignment.
    """
    rng = np.random.default_rng(seed)
    assignment = [rng.integers(0, tasks, images.shape[0]).tolist() for _ in range(batches + 1)]
    images = images.to(device)
    engine = Engine(backbone, device, torch.float32)
    entries = [make_resident(_stored(f"task{i}"), ps, device, torch.float32, backbone.model) for i in range(tasks)]
    prompt_s = _timed(lambda rows: engine.infer(images, [entries[t] for t in rows]), assignment)
    models = [copy.deepcopy(fine_tuned).to(device).eval() for _ in range(tasks)]

    def per_task(rows: list[int]) -> list[torch.Tensor]:
        by_task: dict[int, list[int]] = defaultdict(list)
        for row, task in enumerate(rows):
            by_task[task].append(row)
        out: list[torch.Tensor | None] = [None] * len(rows)
        with torch.inference_mode(), autocast(torch.device(device), torch.float32):
            for task, members in by_task.items():
                probs = models[task](images[members]).float().softmax(-1).cpu()
                for i, row in enumerate(members):
                    out[row] = probs[i]
        return out  # type: ignore[return-value]

    model_s = _timed(per_task, assignment)
    n = images.shape[0] * batches
    return {
        "tasks": tasks,
        "batch": images.shape[0],
        "batches": batches,
        "distinct_tasks_per_batch": float(np.mean([len(set(rows)) for rows in assignment[1:]])),
        "prompt_sets_images_per_s": n / prompt_s,
        "models_images_per_s": n / model_s,
        "prompt_set_resident_bytes": entries[0].nbytes,
        "model_bytes": fine_tuned.nbytes,
        "backbone_bytes": sum(t.numel() * t.element_size() for t in backbone.model.state_dict().values()),
    }


def _timed(run: Callable[[list[int]], Any], assignment: list[list[int]]) -> float:
    """Seconds for every batch but the first (a warm-up)."""
    run(assignment[0])
    start = time.perf_counter()
    for rows in assignment[1:]:
        run(rows)
    return time.perf_counter() - start


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    """The prompt trainer's default steps per epoch, ``ceil(images / B)``."""
    return max(1, math.ceil(train_images / batch_size))
