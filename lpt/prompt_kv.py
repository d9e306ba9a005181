"""Prompt tokens as keys and values only, inside a timm ViT block.

Appending prompt tokens to a block's sequence and dropping their outputs is wasteful: the real tokens see the
prompts only through attention, as keys and values. Every other part of a pre-norm block (norm1, the query
projection, the output projection, LayerScale, norm2, the MLP) is per token, so this computes the real tokens'
outputs exactly with the queries from the real tokens, keys and values from ``[real tokens; prompt tokens]``,
and the rest of the block on the real tokens only. Where only some tokens' outputs are read (the class token after a
token-pooled ViT's last block), queries and everything after attention run on those tokens alone.

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
    keys, values = _project_kv(block.attn, block.norm1(prompts))
    return block.attn.k_norm(keys), values


def _project_rows(attn: torch.nn.Module, h: torch.Tensor, part: slice) -> torch.Tensor:
    """Parts ``part`` (0 query, 1 key, 2 value) of the qkv projection of ``h`` ``[R, T, D]``, as
    ``[parts, R, heads, T, head_dim]``."""
    heads, head_dim = attn.num_heads, _head_dim(attn)
    width = heads * head_dim
    rows = slice(part.start * width, part.stop * width)
    bias = attn.qkv.bias[rows] if attn.qkv.bias is not None else None
    out = F.linear(h, attn.qkv.weight[rows], bias)
    return out.reshape(h.shape[0], h.shape[1], part.stop - part.start, heads, head_dim).permute(2, 0, 3, 1, 4)


def _project_kv(attn: torch.nn.Module, h: torch.Tensor) -> KV:
    """Keys (before k_norm) and values of normed tokens ``h``: only the key and value rows of qkv."""
    keys, values = _project_rows(attn, h, slice(1, 3)).unbind(0)
    return keys, values


def kv_prompted_block(
    block: torch.nn.Module, x: torch.Tensor, prompts_kv: Sequence[KV], out_tokens: int | None = None
) -> torch.Tensor:
    """One block on the real tokens, attending to the real tokens and the given prompt keys/values.

    Equal to ``block(cat([x, prompts]))[:, :N]`` (the append path) up to float rounding; with ``out_tokens``,
    to its first ``out_tokens`` rows.

    Args:
        block: a block for which ``uses_prompt_kv`` holds.
        x: ``[B, N, D]`` real tokens.
        prompts_kv: per prompt group, keys and values ``[B, heads, L_j, head_dim]`` (broadcast views are fine).
        out_tokens: compute the outputs of the first ``out_tokens`` tokens only; every token still serves as a
            key and value. The last block of a class-token-pooled ViT needs one output of N: its queries, output
            projection and MLP then cost a token's worth instead of N. ``None``: every token.
    """
    attn = block.attn
    batch, n, _ = x.shape
    h = block.norm1(x)
    if out_tokens is None or out_tokens >= n:
        q, k, v = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, _head_dim(attn)).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        x = x[:, :out_tokens]
        q = _project_rows(attn, h[:, :out_tokens], slice(0, 1))[0]
        k, v = _project_kv(attn, h)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = _attend(q, [k, *(pk.to(k.dtype) for pk, _ in prompts_kv)], [v, *(pv.to(v.dtype) for _, pv in prompts_kv)])
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).flatten(2))))
    x = x + block.drop_path1(block.ls1(o))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _attend(q: torch.Tensor, key_parts: list[torch.Tensor], value_parts: list[torch.Tensor]) -> torch.Tensor:
    """``scaled_dot_product_attention`` of ``q`` over the concatenated key and value parts (``[B, heads, *, hd]``)."""
    batch, heads, _, head_dim = q.shape
    count = sum(part.shape[2] for part in key_parts)
    pad = (-count) % CPU_KEY_MULTIPLE if q.device.type == "cpu" else 0
    mask = None
    if pad:
        zeros = key_parts[0].new_zeros(1, 1, 1, 1).expand(batch, heads, pad, head_dim)
        key_parts = [*key_parts, zeros]
        value_parts = [*value_parts, zeros.to(value_parts[0].dtype)]
        mask = q.new_zeros(1, 1, 1, count + pad)
        mask[..., count:] = float("-inf")
    keys, values = torch.cat(key_parts, dim=2), torch.cat(value_parts, dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


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
