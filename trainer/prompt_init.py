"""Where training starts: data-informed prompts (``--prompt-init data``) and class-mean head rows.

Why: appending prompt tokens with VPT's small random init (or zeros) to every block can collapse the
features of some backbones. Measured on DeiT-Tiny at 64 px over 100 CIFAR-10 images: the mean pairwise
cosine similarity of the class-token features is 0.78 without prompts, 0.96 with one zero token per
block and 0.998 with L = 10 VPT-initialised tokens, so every image starts out looking the same to the
cosine head. Starting each block's prompt tokens at the mean patch token entering that block (plus the
VPT random values, so tokens differ) keeps the features where they were (0.75 at L = 10), and training
starts from the frozen backbone's own representation. The method note does not fix the init; the
trainer's default and its measured effect are in docs/trainer.md.

Class-mean head (``--head-init class-mean``): each cosine-head row starts at the mean of its class's
normalised features under the starting prompt. The head then starts as a nearest-class-mean classifier,
balanced by construction (every class one mean, however few its images), and the short budgets of small
data sets go into the prompts instead of into first finding the classes.
"""

from __future__ import annotations

from typing import get_args

import torch

from lpt.backbone import Backbone
from lpt.forward import PromptBank, embed, prompted_block, prompted_forward
from lpt.prompt_set import PromptSet
from trainer.config import HeadInit, PromptInit, TrainConfig
from trainer.data import ImageDataset
from trainer.evaluate import autocast
from trainer.samplers import stream_seed

PROMPT_INITS: tuple[str, ...] = get_args(PromptInit)
HEAD_INITS: tuple[str, ...] = get_args(HeadInit)
HEAD_INIT_IMAGES_PER_CLASS = 64  # enough for a class mean; bounds the start-up pass on large data sets
COLLAPSE_CHECK_IMAGES_PER_CLASS = 8
MEAN_TOKEN_IMAGES = 256


def initial_params(
    backbone: Backbone, train_set: ImageDataset, template: PromptSet, cfg: TrainConfig, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Phase 1's starting tensors, and the starting features of a per-class sample (to check for collapse).

    Args:
        backbone: the frozen backbone (on ``device``).
        train_set: the training data (read with the eval transform here).
        template: a freshly initialised prompt set (random tensors of the right shapes).
        cfg: ``prompt_init`` and ``head_init`` choose the start; ``seed`` the images used.
        device: where the forwards run.
    """
    params = {"shared_prompt": template.shared_prompt, "head_weight": template.head_weight}
    if template.pool_size:
        params.update(group_prompts=template.group_prompts, group_keys=template.group_keys)
    if cfg.prompt_init == "data":
        means = mean_tokens(backbone, train_set, None, cfg, device)  # [depth, D] of the plain backbone
        params["shared_prompt"] = template.shared_prompt + means[:, None, :]
    per_class = HEAD_INIT_IMAGES_PER_CLASS if cfg.head_init == "class-mean" else COLLAPSE_CHECK_IMAGES_PER_CLASS
    indices = per_class_sample(train_set.targets, per_class, cfg.seed)
    features = prompt_features(backbone, train_set, template, params["shared_prompt"], indices, cfg, device)
    if cfg.head_init == "class-mean":
        targets = torch.tensor([train_set.targets[i] for i in indices])
        params["head_weight"] = class_mean_head(features, targets, len(train_set.class_names), template.head_weight)
    return params, features


def initial_group_prompts(
    backbone: Backbone,
    train_set: ImageDataset,
    template: PromptSet,
    shared: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
) -> torch.Tensor | None:
    """Phase 2's starting pool when ``prompt_init=data``: the template's noise plus the mean token entering each
    unshared block under the trained shared prompt; ``None`` keeps the template's pool."""
    if cfg.prompt_init != "data":
        return None
    means = mean_tokens(backbone, train_set, shared.to(device), cfg, device)[template.share_blocks :]
    return template.group_prompts + means[None, :, None, :]


@torch.no_grad()
def prompt_features(
    backbone: Backbone,
    dataset: ImageDataset,
    template: PromptSet,
    shared: torch.Tensor,
    indices: list[int],
    cfg: TrainConfig,
    device: torch.device,
) -> torch.Tensor:
    """``[N, D]`` features of images ``indices`` of ``dataset`` (eval transform) under the shared prompt alone."""
    out = []
    bank = PromptBank.from_tensors(shared.to(device), template.head_weight.to(device), template.share_blocks)
    for start in range(0, len(indices), cfg.eval_batch_size):
        chunk = indices[start : start + cfg.eval_batch_size]
        images = torch.stack([backbone.eval_transform(dataset.source.load(i)) for i in chunk])
        with autocast(device, cfg.amp):
            out.append(prompted_forward(backbone.model, images.to(device), bank).features.float().cpu())
    return torch.cat(out)


def mean_tokens(
    backbone: Backbone, dataset: ImageDataset, shared: torch.Tensor | None, cfg: TrainConfig, device: torch.device
) -> torch.Tensor:
    """``[depth, D]`` mean patch token entering each block over a seeded sample of ``dataset``."""
    images = sample_images(dataset, backbone.eval_transform, MEAN_TOKEN_IMAGES, cfg.seed).to(device)
    return mean_patch_tokens(backbone.model, images, shared, cfg.eval_batch_size).cpu()


def sample_images(dataset: ImageDataset, transform, count: int, seed: int) -> torch.Tensor:
    """``count`` images (a seeded choice, the same on every rank) through ``transform``, stacked."""
    gen = torch.Generator().manual_seed(stream_seed(seed, 99))
    order = torch.randperm(len(dataset), generator=gen)[:count].tolist()
    return torch.stack([transform(dataset.source.load(i)) for i in order])


@torch.no_grad()
def mean_patch_tokens(
    model: torch.nn.Module, images: torch.Tensor, shared: torch.Tensor | None = None, batch_size: int = 64
) -> torch.Tensor:
    """``[depth, D]``: the mean patch token entering each block (with the shared prompt appended when given).

    Args:
        model: the frozen ViT.
        images: preprocessed images.
        shared: ``[depth, L, D]`` shared prompt, or ``None`` for the plain backbone.
        batch_size: images per forward.
    """
    depth = len(model.blocks)
    total = None
    prefix = getattr(model, "num_prefix_tokens", 1)
    for start in range(0, len(images), batch_size):
        x = embed(model, images[start : start + batch_size])
        sums = []
        for i, block in enumerate(model.blocks):
            sums.append(x[:, prefix:].float().mean(dim=1).sum(dim=0))
            prompts = [] if shared is None else [shared[i].to(x.dtype).expand(x.shape[0], -1, -1)]
            x = prompted_block(block, x, prompts) if prompts else block(x)
        batch = torch.stack(sums)
        total = batch if total is None else total + batch
    assert total is not None and total.shape[0] == depth
    return total / len(images)


@torch.no_grad()
def class_mean_head(
    features: torch.Tensor, targets: torch.Tensor, num_classes: int, fallback: torch.Tensor
) -> torch.Tensor:
    """``[C, D]`` unit rows: the mean of each class's unit-normalised features (``fallback`` rows for classes
    without images).

    Args:
        features: ``[N, D]`` features.
        targets: ``[N]`` class indices.
        num_classes: C.
        fallback: ``[C, D]`` rows to keep where a class has no features.
    """
    f = torch.nn.functional.normalize(features.float(), dim=1)
    sums = torch.zeros(num_classes, f.shape[1]).index_add_(0, targets, f)
    counts = torch.bincount(targets, minlength=num_classes)
    head = torch.where((counts > 0)[:, None], sums, fallback.float())
    return torch.nn.functional.normalize(head, dim=1)


def per_class_sample(targets: list[int], per_class: int, seed: int) -> list[int]:
    """Dataset indices: at most ``per_class`` of each class, a seeded choice (the same on every rank)."""
    gen = torch.Generator().manual_seed(stream_seed(seed, 98))
    by_class: dict[int, list[int]] = {}
    for i in torch.randperm(len(targets), generator=gen).tolist():
        members = by_class.setdefault(int(targets[i]), [])
        if len(members) < per_class:
            members.append(i)
    return sorted(i for members in by_class.values() for i in members)
