"""A plainly written reference of the published two-pass LPT inference (tests and benchmarks only).

Written straight from the method note, one image at a time, with timm's modules called directly and
nothing shared with ``lpt.forward``, so agreement between the two means something.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lpt.prompt_set import PromptSet


def _tokens(model, image: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed(image[None])
    x = model._pos_embed(x)
    return model.norm_pre(x)


def _pass(model, x: torch.Tensor, prompt_for_block) -> torch.Tensor:
    n = x.shape[1]
    for i, block in enumerate(model.blocks):
        x = block(torch.cat([x, prompt_for_block(i)[None].to(x.dtype)], dim=1))[:, :n]
    return model.norm(x)[:, 0]


def two_pass_reference(model, images: torch.Tensor, ps: PromptSet) -> torch.Tensor:
    """Logits ``[B, C]`` of the published algorithm: query pass, key matching, final pass, cosine head."""
    out = []
    for image in images:
        x = _tokens(model, image)
        q = _pass(model, x, lambda i: ps.shared_prompt[i])
        feature = q
        if ps.pool_size:
            sim = F.cosine_similarity(q.float(), ps.group_keys.float(), dim=-1)  # [P]
            idx = sim.topk(ps.top_k).indices
            group = ps.group_prompts[idx].mean(dim=0)  # [depth - S, L, D]

            def final_prompt(i: int, group=group) -> torch.Tensor:
                if i < ps.share_blocks:
                    return ps.shared_prompt[i]
                return torch.cat([ps.shared_prompt[i], group[i - ps.share_blocks]], dim=0)

            feature = _pass(model, x, final_prompt)
        cos = F.cosine_similarity(feature.float(), ps.head_weight.float(), dim=-1)  # [C]
        out.append(ps.head_scale * cos)
    return torch.stack(out)


def two_pass_batched(model, images: torch.Tensor, ps: PromptSet) -> torch.Tensor:
    """The same published algorithm over a whole batch (two full passes): the benchmark's baseline."""
    x = _tokens_batch(model, images)
    b = images.shape[0]
    q = _pass_batch(model, x, lambda i: ps.shared_prompt[i].expand(b, -1, -1))
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

        feature = _pass_batch(model, x, final_prompt)
    return ps.head_scale * (F.normalize(feature.float(), dim=-1) @ F.normalize(ps.head_weight.float(), dim=-1).t())


def _tokens_batch(model, images: torch.Tensor) -> torch.Tensor:
    return model.norm_pre(model._pos_embed(model.patch_embed(images)))


def _pass_batch(model, x: torch.Tensor, prompt_for_block) -> torch.Tensor:
    n = x.shape[1]
    for i, block in enumerate(model.blocks):
        x = block(torch.cat([x, prompt_for_block(i).to(x.dtype)], dim=1))[:, :n]
    return model.norm(x)[:, 0]
