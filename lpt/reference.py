"""The straightforward two-pass LPT reference that the optimized forward (``lpt.forward``) is checked against.

Written straight from the method note: a query pass with the shared prompt, key matching against the group
keys, a final pass with the shared and the chosen group prompts appended in every block, then the cosine head.
timm's modules are called directly and nothing is shared with ``lpt.forward``, so agreement between the two
means something. ``two_pass_reference`` runs one image at a time; ``two_pass_batched`` runs the same algorithm
over a whole batch and is the engine benchmark's two-pass baseline. Neither is used to serve.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lpt.prompt_set import PromptSet

PromptForBlock = Callable[[int], torch.Tensor]  # block index -> the prompt tokens appended in that block


def two_pass_reference(model: torch.nn.Module, images: torch.Tensor, ps: PromptSet) -> torch.Tensor:
    """Logits ``[B, C]`` of the published algorithm, one image at a time: query pass, key matching, final pass,
    cosine head.

    Args:
        model: a timm ViT (frozen backbone).
        images: ``[B, 3, H, W]`` input batch.
        ps: the prompt set (with or without a pool).
    """
    out = []
    for image in images:
        x = _tokens(model, image[None])
        q = _pass(model, x, lambda i: ps.shared_prompt[i][None])[0]
        feature = q
        if ps.pool_size:
            sim = F.cosine_similarity(q.float(), ps.group_keys.float(), dim=-1)  # [P]
            idx = sim.topk(ps.top_k).indices
            group = ps.group_prompts[idx].mean(dim=0)  # [depth - S, L, D]

            def final_prompt(i: int, group: torch.Tensor = group) -> torch.Tensor:
                if i < ps.share_blocks:
                    return ps.shared_prompt[i][None]
                return torch.cat([ps.shared_prompt[i], group[i - ps.share_blocks]], dim=0)[None]

            feature = _pass(model, x, final_prompt)[0]
        cos = F.cosine_similarity(feature.float(), ps.head_weight.float(), dim=-1)  # [C]
        out.append(ps.head_scale * cos)
    return torch.stack(out)


def two_pass_batched(model: torch.nn.Module, images: torch.Tensor, ps: PromptSet) -> torch.Tensor:
    """The same published algorithm over a whole batch (two full passes): logits ``[B, C]``.

    Args:
        model: a timm ViT (frozen backbone).
        images: ``[B, 3, H, W]`` input batch.
        ps: the prompt set (with or without a pool).
    """
    x = _tokens(model, images)
    b = images.shape[0]
    q = _pass(model, x, lambda i: ps.shared_prompt[i].expand(b, -1, -1))
    feature = q
    if ps.pool_size:
        sim = F.normalize(q.float(), dim=-1) @ F.normalize(ps.group_keys.float(), dim=-1).t()
        idx = sim.topk(ps.top_k, dim=1).indices  # [B, k]
        group = ps.group_prompts[idx].mean(dim=1)  # [B, depth - S, L, D]

        def final_prompt(i: int) -> torch.Tensor:
            shared = ps.shared_prompt[i].expand(b, -1, -1)
            if i < ps.share_blocks:
                return shared
            return torch.cat([shared, group[:, i - ps.share_blocks]], dim=1)

        feature = _pass(model, x, final_prompt)
    return ps.head_scale * (F.normalize(feature.float(), dim=-1) @ F.normalize(ps.head_weight.float(), dim=-1).t())


def _tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding, class token and position embedding: ``[B, N, D]``."""
    return model.norm_pre(model._pos_embed(model.patch_embed(images)))


def _pass(model: torch.nn.Module, x: torch.Tensor, prompt_for_block: PromptForBlock) -> torch.Tensor:
    """Every block on the image tokens with that block's prompt tokens ``[B, L', D]`` appended (and dropped after
    it); the normed class token ``[B, D]``."""
    n = x.shape[1]
    for i, block in enumerate(model.blocks):
        x = block(torch.cat([x, prompt_for_block(i).to(x.dtype)], dim=1))[:, :n]
    return model.norm(x)[:, 0]
