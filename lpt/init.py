"""Fresh prompt sets: the trainer's starting point, and the offline demo task."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lpt.backbone import BackboneInfo
from lpt.prompt_set import PromptSet


def init_prompt_set(
    backbone: BackboneInfo,
    class_names: Sequence[str],
    prompt_length: int = 10,
    pool_size: int = 20,
    share_blocks: int = 6,
    top_k: int = 2,
    head_scale: float = 20.0,
    seed: int = 0,
) -> PromptSet:
    """A prompt set with VPT-style uniform init for prompts, keys and head (reproducible for a seed).

    Args:
        backbone: the backbone the set is for (depth, width and fingerprint are taken from it).
        class_names: one name per class; the head gets one row each.
        prompt_length: L, prompt tokens per block.
        pool_size: P, group prompts in the pool; 0 gives a shared-prompt-only (deep VPT) set.
        share_blocks: S, blocks that only see the shared prompt.
        top_k: group prompts averaged per image.
        head_scale: s in logits = s * cos(feature, w_c).
        seed: init seed.
    """
    depth, dim = backbone.depth, backbone.embed_dim
    share_blocks = min(share_blocks, depth - 1)
    gen = torch.Generator().manual_seed(seed)
    # VPT init: uniform in +-sqrt(6 / (fan_in + fan_out)) with fan_in = patch dim, fan_out = D.
    patch_dim = 3 * backbone.patch_size**2
    bound = math.sqrt(6.0 / (patch_dim + dim))

    def uniform(*shape: int, scale: float = bound) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1) * scale

    group_prompts = uniform(pool_size, depth - share_blocks, prompt_length, dim) if pool_size else None
    group_keys = uniform(pool_size, dim, scale=1.0) if pool_size else None
    return PromptSet(
        shared_prompt=uniform(depth, prompt_length, dim),
        head_weight=uniform(len(class_names), dim, scale=1.0 / math.sqrt(dim)),
        class_names=list(class_names),
        backbone=backbone.name,
        backbone_fingerprint=backbone.fingerprint,
        share_blocks=share_blocks,
        top_k=min(top_k, pool_size) if pool_size else 1,
        head_scale=head_scale,
        group_prompts=group_prompts,
        group_keys=group_keys,
        backbone_input_size=backbone.input_size,
    )
