"""Fresh prompt sets: the trainer's starting point, and the offline demo task."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lpt.backbone import BackboneInfo
from lpt.prompt_set import DEFAULT_HEAD_SCALE, PromptSet

INIT_STYLES = ("normal", "vpt")


def init_prompt_set(
    backbone: BackboneInfo,
    class_names: Sequence[str],
    prompt_length: int = 10,
    pool_size: int = 20,
    share_blocks: int = 6,
    top_k: int = 2,
    head_scale: float = DEFAULT_HEAD_SCALE,
    seed: int = 0,
    style: str = "vpt",
) -> PromptSet:
    """A fresh prompt set, reproducible for a seed.

    ``style="normal"`` is the LPT authors' init: prompts, pool and keys from a normal distribution with std
    0.02 truncated at +-2 std, head rows of unit norm. ``style="vpt"`` is VPT's uniform init (prompts
    uniform in +-sqrt(6 / (patch dim + D)), keys uniform in +-1, head rows of norm ~0.58). Because prompts
    are matched and classified by cosine similarity, a key's or a head row's gradient scales with 1 / its
    norm: the authors' small keys move toward their queries, VPT's large ones barely do.

    Args:
        backbone: the backbone the set is for (depth, width and fingerprint are taken from it).
        class_names: one name per class; the head gets one row each.
        prompt_length: L, prompt tokens per block.
        pool_size: P, group prompts in the pool; 0 gives a shared-prompt-only (deep VPT) set.
        share_blocks: S, blocks that only see the shared prompt.
        top_k: group prompts averaged per image.
        head_scale: s in logits = s * cos(feature, w_c).
        seed: init seed.
        style: ``normal`` (the LPT authors') or ``vpt``.
    """
    if style not in INIT_STYLES:
        raise ValueError(f"style must be one of {INIT_STYLES}, got {style!r}")
    depth, dim = backbone.depth, backbone.embed_dim
    share_blocks = min(share_blocks, depth - 1)
    gen = torch.Generator().manual_seed(seed)
    # VPT init: uniform in +-sqrt(6 / (fan_in + fan_out)) with fan_in = patch dim, fan_out = D.
    patch_dim = 3 * backbone.patch_size**2
    bound = math.sqrt(6.0 / (patch_dim + dim))

    def uniform(*shape: int, scale: float = bound) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1) * scale

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        # timm's trunc_normal_ draws from the global generator; this one is seeded and local
        return (torch.randn(*shape, generator=gen) * std).clamp_(-2 * std, 2 * std)

    draw = normal if style == "normal" else uniform
    key_scale = {} if style == "normal" else {"scale": 1.0}
    group_prompts = draw(pool_size, depth - share_blocks, prompt_length, dim) if pool_size else None
    group_keys = draw(pool_size, dim, **key_scale) if pool_size else None
    shared_prompt = draw(depth, prompt_length, dim)
    if style == "normal":
        head = torch.nn.functional.normalize(torch.randn(len(class_names), dim, generator=gen), dim=1)
    else:
        head = uniform(len(class_names), dim, scale=1.0 / math.sqrt(dim))
    return PromptSet(
        shared_prompt=shared_prompt,
        head_weight=head,
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
