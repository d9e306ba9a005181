"""Prompt tokens as keys and values only, inside a timm ViT block.

Appending prompt tokens to a block's sequence and dropping their outputs is wasteful: the real tokens see the
prompts only through attention, as keys and values. Every other part of a pre-norm block (norm1, the query
projection, the output projection, LayerScale, norm2, the MLP) is per token, so this computes the real tokens'
outputs exactly with the queries from the real tokens, keys and values from ``[real tokens; prompt tokens]``,
and the rest of the block on the real tokens only.

A prompt's keys and values are ``k_norm(W_k norm1(p) + b_k)`` and ``W_v norm1(p) + b_v``: they depend on the
prompt and the block alone. A shared prompt's are therefore the same for every image and every request, and
``precompute_shared_kv`` computes them once per resident set (``SharedKV``). The group prompt (the mean of the
top-k pool entries) is projected per row: norm1 is not linear, so the mean of the projections would be wrong.

Only plain timm ``Block``/``Attention`` pairs take this path; any other block (another block class, another
attention, an attention gate, attention dropout while training, or hooks on the block that expect to see it
called) runs the reference token-append path, which is exact for any block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

from lpt.prompt_set import PromptSet

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [R, heads, L, head_dim] each
# PyTorch's CPU attention kernel is markedly slower for key counts off a multiple of 16 (207 keys took 20 % longer
# than 197 or 208 here); padding with masked zero keys is exact (their weight is exp(-inf) = 0) and cheaper. GPU
# kernels need no padding, and a mask would keep them off their fastest kernels.
CPU_KEY_MULTIPLE = 16


def _head_dim(attn: torch.nn.Module) -> int:
    return int(getattr(attn, "head_dim", 0) or 0)


def kv_structure_supported(block: torch.nn.Module) -> bool:
    """Whether the block is a plain timm pre-norm ``Block`` with a plain ``Attention`` (qkv as one linear).

    Args:
        block: one of the ViT's blocks.
    """
    attn = getattr(block, "attn", None)
    if type(block) is not Block or type(attn) is not Attention:
        return False
    if getattr(attn, "gate", None) is not None or not isinstance(attn.qkv, torch.nn.Linear):
        return False
    return attn.qkv.out_features == 3 * attn.num_heads * _head_dim(attn)


def uses_prompt_kv(block: torch.nn.Module) -> bool:
    """Whether this call of the block can take the keys/values path (structure, mode and hooks).

    Attention dropout in training would drop prompt and real keys with other random draws than the append path;
    hooks on the block or its attention expect the module to be called. Both take the append path.

    Args:
        block: one of the ViT's blocks.
    """
    if not kv_structure_supported(block):
        return False
    attn = block.attn
    if attn.training and attn.attn_drop.p > 0:
        return False
    return not (block._forward_hooks or block._forward_pre_hooks or attn._forward_hooks or attn._forward_pre_hooks)


def prompt_kv(block: torch.nn.Module, prompts: torch.Tensor) -> KV:
    """Keys and values of prompt tokens in one block (norm1, the k/v rows of qkv, k_norm).

    Args:
        block: a block for which ``kv_structure_supported`` holds.
        prompts: ``[R, L, D]`` prompt tokens.

    Returns:
        keys and values, ``[R, heads, L, head_dim]`` each.
    """
    attn = block.attn
    heads, head_dim = attn.num_heads, _head_dim(attn)
    width = heads * head_dim
    h = block.norm1(prompts)
    bias = attn.qkv.bias[width:] if attn.qkv.bias is not None else None
    kv = F.linear(h, attn.qkv.weight[width:], bias)  # only the key and value rows: no query for a prompt
    kv = kv.reshape(prompts.shape[0], prompts.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    keys, values = kv.unbind(0)
    return attn.k_norm(keys), values


def kv_prompted_block(block: torch.nn.Module, x: torch.Tensor, prompts_kv: Sequence[KV]) -> torch.Tensor:
    """One block on the real tokens, attending to the real tokens and the given prompt keys/values.

    Equal to ``block(cat([x, prompts]))[:, :N]`` (the append path) up to float rounding.

    Args:
        block: a block for which ``uses_prompt_kv`` holds.
        x: ``[B, N, D]`` real tokens.
        prompts_kv: per prompt group, keys and values ``[B, heads, L_j, head_dim]`` (broadcast views are fine).
    """
    attn = block.attn
    batch, n, _ = x.shape
    heads, head_dim = attn.num_heads, _head_dim(attn)
    qkv = attn.qkv(block.norm1(x)).reshape(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    key_parts = [k, *(pk.to(k.dtype) for pk, _ in prompts_kv)]
    value_parts = [v, *(pv.to(v.dtype) for _, pv in prompts_kv)]
    count = sum(part.shape[2] for part in key_parts)
    pad = (-count) % CPU_KEY_MULTIPLE if x.device.type == "cpu" else 0
    mask = None
    if pad:
        zeros = k.new_zeros(1, 1, 1, 1).expand(batch, heads, pad, head_dim)
        key_parts.append(zeros)
        value_parts.append(zeros.to(v.dtype))
        mask = q.new_zeros(1, 1, 1, count + pad)
        mask[..., count:] = float("-inf")
    keys, values = torch.cat(key_parts, dim=2), torch.cat(value_parts, dim=2)
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(batch, n, heads * head_dim))))
    x = x + block.drop_path1(block.ls1(o))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


@dataclass(frozen=True)
class SharedKV:
    """One prompt set's shared-prompt keys and values in every block, for one backbone's weights.

    Only valid with the model it was computed with (the service has one backbone). Blocks that do not take the
    keys/values path hold zeros here and are never read.

    Attributes:
        kv: ``[depth, 2, heads, L, head_dim]`` (keys then values), or an empty tensor when no block qualifies.
    """

    kv: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Device bytes these keys and values take (what a cache must count)."""
        return self.kv.numel() * self.kv.element_size()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SharedKV:
        return SharedKV(self.kv.to(device=device, dtype=dtype))


def precompute_shared_kv(
    model: torch.nn.Module, prompt_set: PromptSet | torch.Tensor, dtype: torch.dtype | None = None
) -> SharedKV:
    """Keys and values of a set's shared prompt in every supported block, computed once (no autograd).

    Call it when a set becomes resident, on the device it will serve from. The projection runs in the block's
    parameter dtype (float32 for the frozen backbone) and the result is stored in ``dtype``.

    Args:
        model: the timm ViT the set will run with.
        prompt_set: the set, or its ``[depth, L, D]`` shared prompt.
        dtype: storage dtype; default: the shared prompt's.
    """
    shared = prompt_set.shared_prompt if isinstance(prompt_set, PromptSet) else prompt_set
    dtype = dtype or shared.dtype
    blocks = list(model.blocks)
    supported = [kv_structure_supported(b) for b in blocks]
    if not any(supported):
        return SharedKV(shared.new_zeros(0, dtype=dtype))
    ref = blocks[supported.index(True)].attn
    shape = (2, ref.num_heads, shared.shape[1], _head_dim(ref))
    out = []
    with torch.no_grad(), torch.autocast(shared.device.type, enabled=False):
        for block, ok, prompt in zip(blocks, supported, shared, strict=True):
            if not ok:
                out.append(shared.new_zeros(shape, dtype=dtype))
                continue
            weight = block.attn.qkv.weight
            keys, values = prompt_kv(block, prompt[None].to(device=weight.device, dtype=weight.dtype))
            out.append(torch.stack([keys[0], values[0]]).to(dtype))
    return SharedKV(torch.stack(out).contiguous())
