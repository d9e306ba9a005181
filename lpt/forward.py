"""The prompted-ViT forward of LPT, for one task or many tasks in one batch.

The published inference runs two full passes: a query pass with the shared prompt only, then a final
pass with shared + group prompts. Blocks ``0..S-1`` see the same input in both passes, so they run
once here and their output feeds both the query half-pass and the final half-pass (exact, and a
quarter less work). Rows whose prompt set has no pool (plain deep VPT) take the query output as their
feature and skip the final half-pass.

Mixed-task batches: every row carries a slot index into a ``PromptBank`` of stacked per-slot tensors
(padded to the largest pool and class count in the bank, with counts that mask the padding), so rows
from sets with different class counts, pool sizes and top-k share one forward. All sets in one bank
share the prompt length L and ``share_blocks`` S (token counts must agree inside a block); callers
with several geometries run one forward per geometry.

Inside a block, prompt tokens enter attention as keys and values only (``lpt.prompt_kv``): queries, the output
projection and the MLP run on the real tokens, and in the last block of a class-token-pooled ViT on the class
token alone (the pooling reads nothing else). A bank may carry its sets' precomputed shared-prompt keys and
values (``SharedKV``, computed once when a set becomes resident); without them (the trainer) they are computed
per slot on the fly. Blocks that path does not support run with the prompt tokens appended, as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from lpt.prompt_kv import KV, SharedKV, kv_prompted_block, precompute_shared_kv, prompt_kv, uses_prompt_kv
from lpt.prompt_set import DEFAULT_HEAD_SCALE, PromptSet

__all__ = [
    "COMPUTE_DTYPES",
    "PromptBank",
    "PromptedOutput",
    "SharedKV",
    "autocast",
    "cosine_logits",
    "embed",
    "pool_features",
    "pooled_tokens",
    "precompute_shared_kv",
    "prompted_block",
    "prompted_forward",
    "select_group_prompts",
]

# Compute dtypes by name (settings and benchmark flags); bf16/fp16 run under autocast.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device``; float32 runs without it."""
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class PromptBank:
    """Prompt tensors for ``n`` slots; row ``b`` of a batch uses slot ``slots[b]``.

    The small, per-block tensors are stacked (a row gather per block is one index op); the large ones
    (pools and heads, most of a set's bytes) stay per-slot tensors that the forward indexes in place,
    so building a bank for a mixed batch copies no pool and no head.

    Attributes:
        shared: ``[n, depth, L, D]`` shared prompts.
        keys: ``[n, Pmax, D]`` group keys, zero-padded to the largest pool (``Pmax`` may be 0).
        pools: per slot ``[P_i, depth - S, L, D]`` group prompt pools (``P_i`` may be 0).
        heads: per slot ``[C_i, D]`` raw cosine-head weights.
        pool_size, top_k, num_classes: ``[n]`` long; head_scale: ``[n]`` float.
        share_blocks: S, the same for every slot.
        shared_kv: ``[n, depth, 2, heads, L, head_dim]`` precomputed shared-prompt keys and values
            (``SharedKV``), or ``None``: computed from ``shared`` during the forward.
    """

    shared: torch.Tensor
    keys: torch.Tensor
    pools: list[torch.Tensor]
    heads: list[torch.Tensor]
    pool_size: torch.Tensor
    top_k: torch.Tensor
    num_classes: torch.Tensor
    head_scale: torch.Tensor
    share_blocks: int
    shared_kv: torch.Tensor | None = None

    @property
    def num_slots(self) -> int:
        return self.shared.shape[0]

    @property
    def geometry(self) -> tuple[int, int]:
        """(prompt length L, share_blocks S): sets must agree on both to share a bank."""
        return self.shared.shape[2], self.share_blocks

    @classmethod
    def from_tensors(
        cls,
        shared: torch.Tensor,
        head: torch.Tensor,
        share_blocks: int,
        pool: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        top_k: int = 1,
        head_scale: float = DEFAULT_HEAD_SCALE,
        shared_kv: SharedKV | None = None,
    ) -> PromptBank:
        """A one-slot bank over live tensors (e.g. the trainer's parameters); autograd flows through.

        ``shared_kv``: the set's precomputed shared keys/values (frozen sets only: they carry no gradient).
        """
        depth, length, dim = shared.shape
        if pool is None or pool.shape[0] == 0:
            pool = shared.new_zeros(0, depth - share_blocks, length, dim)
            keys = shared.new_zeros(0, dim)
        dev = shared.device
        return cls(
            shared=shared.unsqueeze(0),
            keys=keys.unsqueeze(0),
            pools=[pool],
            heads=[head],
            pool_size=torch.tensor([pool.shape[0]], device=dev),
            top_k=torch.tensor([top_k if pool.shape[0] else 0], device=dev),
            num_classes=torch.tensor([head.shape[0]], device=dev),
            head_scale=torch.tensor([float(head_scale)], device=dev),
            share_blocks=share_blocks,
            shared_kv=_stack_kv([shared_kv], shared.device, None),
        )

    @classmethod
    def stack(
        cls,
        sets: Sequence[PromptSet],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        shared_kv: Sequence[SharedKV | None] | None = None,
    ) -> PromptBank:
        """A bank over prompt sets of one geometry (pools and heads are referenced, not copied,
        when already on ``device`` in ``dtype``).

        Args:
            sets: the slots' prompt sets, in slot order.
            device: where the bank lives.
            dtype: prompt dtype (default float32).
            shared_kv: each set's precomputed ``SharedKV`` (same order); used only when every set has one.
        """
        if not sets:
            raise ValueError("cannot stack zero prompt sets")
        geometries = {(ps.prompt_length, ps.share_blocks) for ps in sets}
        if len(geometries) != 1:
            raise ValueError(f"sets of different geometry (L, S) cannot share a bank: {sorted(geometries)}")
        first = sets[0]
        depth, length, dim = first.shared_prompt.shape
        share = first.share_blocks
        dtype = dtype or torch.float32
        pmax = max(ps.pool_size for ps in sets)
        keys = torch.zeros(len(sets), pmax, dim, device=device, dtype=dtype)
        pools = []
        for i, ps in enumerate(sets):
            if ps.pool_size:
                keys[i, : ps.pool_size] = ps.group_keys
                pools.append(ps.group_prompts.to(device=device, dtype=dtype))
            else:
                pools.append(torch.zeros(0, depth - share, length, dim, device=device, dtype=dtype))
        return cls(
            shared=torch.stack([ps.shared_prompt.to(device=device, dtype=dtype) for ps in sets]),
            keys=keys,
            pools=pools,
            heads=[ps.head_weight.to(device=device, dtype=dtype) for ps in sets],
            pool_size=torch.tensor([ps.pool_size for ps in sets], device=device),
            top_k=torch.tensor([ps.top_k if ps.pool_size else 0 for ps in sets], device=device),
            num_classes=torch.tensor([ps.num_classes for ps in sets], device=device),
            head_scale=torch.tensor([float(ps.head_scale) for ps in sets], device=device, dtype=torch.float32),
            share_blocks=share,
            shared_kv=_stack_kv(shared_kv or [None], device, dtype),
        )


def _stack_kv(kvs: Sequence[SharedKV | None], device: torch.device | str | None, dtype: torch.dtype | None):
    if any(kv is None or kv.kv.numel() == 0 for kv in kvs):
        return None
    if len(kvs) == 1:
        return kvs[0].kv.to(device=device, dtype=dtype).unsqueeze(0)  # a view when already in place
    return torch.stack([kv.kv for kv in kvs]).to(device=device, dtype=dtype)


@dataclass
class PromptedOutput:
    """Result of a prompted forward.

    Attributes:
        logits: ``[B, Cmax]`` head_scale * cosine; classes past a row's class count are ``-inf``.
        features: ``[B, D]`` final-norm class-token features fed to the head.
        query: ``[B, D]`` the query-pass features (shared prompt only).
        key_sim: ``[B]`` summed cosine similarity between the query and its selected keys (0 without a pool);
            the trainer's ``sim`` term is its mean.
        selected: ``[B, kmax]`` selected pool indices (-1 where unused).
    """

    logits: torch.Tensor
    features: torch.Tensor
    query: torch.Tensor
    key_sim: torch.Tensor
    selected: torch.Tensor


def embed(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding, class token and position embedding: timm's forward_features up to the blocks."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def prompted_block(block: torch.nn.Module, x: torch.Tensor, prompts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Run one block with prompt tokens appended after the sequence, then drop their outputs."""
    n = x.shape[1]
    tokens = torch.cat([x, *(p.to(x.dtype) for p in prompts)], dim=1)
    return block(tokens)[:, :n]


def pool_features(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Final norm then timm's own pooling (the class token for token-pooled ViTs)."""
    return model.forward_head(model.norm(x), pre_logits=True)


def _per_row(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    # A one-slot bank (single task, trainer) needs no gather: a broadcast view costs nothing.
    if t.shape[0] == 1:
        return t.expand(slots.shape[0], *t.shape[1:])
    return t[slots]


def _slot_rows(slots: torch.Tensor, num_slots: int) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, row indices) for every slot present; ``None`` rows means every row (one slot in use)."""
    if num_slots == 1:
        return [(0, None)]
    present = torch.unique(slots).tolist()
    if len(present) == 1:
        return [(present[0], None)]
    return [(j, (slots == j).nonzero().squeeze(1)) for j in present]


def select_group_prompts(
    bank: PromptBank, slots: torch.Tensor, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match queries to their set's keys; return (mean of top-k prompts, summed key sim, indices).

    Args:
        bank: prompt bank (every slot in ``slots`` has a pool).
        slots: ``[R]`` slot per row.
        query: ``[R, D]`` query features.

    Returns:
        group ``[R, depth - S, L, D]``, key_sim ``[R]``, selected ``[R, kmax]`` (-1 where unused).
    """
    keys = _per_row(bank.keys, slots)  # [R, Pmax, D]
    sim = torch.einsum("rd,rpd->rp", F.normalize(query.float(), dim=-1), F.normalize(keys.float(), dim=-1))
    pmax = keys.shape[1]
    valid = torch.arange(pmax, device=sim.device)[None, :] < bank.pool_size[slots][:, None]
    sim = sim.masked_fill(~valid, float("-inf"))
    k_row = bank.top_k[slots]
    kmax = int(k_row.max())
    top_sim, top_idx = sim.topk(kmax, dim=1)
    used = torch.arange(kmax, device=sim.device)[None, :] < k_row[:, None]
    weights = used.to(sim.dtype) / k_row[:, None].to(sim.dtype)
    safe_idx = torch.where(used, top_idx, torch.zeros_like(top_idx))  # padding picks entry 0 with weight 0
    parts = []
    for slot, rows in _slot_rows(slots, bank.num_slots):
        pool = bank.pools[slot]
        idx, w = (safe_idx, weights) if rows is None else (safe_idx[rows], weights[rows])
        parts.append((rows, torch.einsum("rk,rkdlc->rdlc", w.to(pool.dtype), pool[idx]).to(pool.dtype)))
    if len(parts) == 1:
        group = parts[0][1]
    else:
        group = parts[0][1].new_empty(len(slots), *parts[0][1].shape[1:])
        for rows, part in parts:
            group[rows] = part
    key_sim = torch.where(used, top_sim, torch.zeros_like(top_sim)).sum(dim=1)
    return group, key_sim, torch.where(used, top_idx, torch.full_like(top_idx, -1))


def cosine_logits(bank: PromptBank, slots: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``head_scale * cos(feature, w_c)`` per row against its own set's head; padding classes -> -inf."""
    f = F.normalize(features.float(), dim=-1)
    cmax = int(bank.num_classes.max()) if bank.num_slots > 1 else bank.heads[0].shape[0]
    parts = []
    # The head is a sliver of the work: keep cosines in float32 even under bf16/fp16 autocast.
    with torch.autocast(f.device.type, enabled=False):
        for slot, rows in _slot_rows(slots, bank.num_slots):
            w = F.normalize(bank.heads[slot].float(), dim=-1)
            parts.append((rows, slot, (f if rows is None else f[rows]) @ w.t()))
    if len(parts) == 1 and parts[0][2].shape[1] == cmax:
        logits = parts[0][2]
    else:
        logits = f.new_full((f.shape[0], cmax), float("-inf"))
        for rows, _slot, cos in parts:
            if rows is None:
                logits[:, : cos.shape[1]] = cos
            else:
                logits[rows, : cos.shape[1]] = cos
    return logits * bank.head_scale[slots][:, None]


class _BlockRunner:
    """Runs block ``i`` for rows of given slots with the shared (and optionally a group) prompt.

    Shared keys/values per slot are taken from the bank when precomputed, else computed once per block and
    forward (the query and final half-passes share them); rows gather their slot's with one index op.
    """

    def __init__(self, blocks: torch.nn.ModuleList, bank: PromptBank, append: bool):
        self.blocks, self.bank = blocks, bank
        self.fast = [not append and uses_prompt_kv(b) for b in blocks]
        self._slot_kv: dict[int, torch.Tensor] = {}

    def _shared_kv(self, i: int, slots: torch.Tensor) -> KV:
        kv = self._slot_kv.get(i)
        if kv is None:
            if self.bank.shared_kv is not None:
                kv = self.bank.shared_kv[:, i]
            else:
                kv = torch.stack(prompt_kv(self.blocks[i], self.bank.shared[:, i]), dim=1)
            self._slot_kv[i] = kv  # [n, 2, heads, L, head_dim]
        rows = _per_row(kv, slots)
        return rows[:, 0], rows[:, 1]

    def __call__(
        self,
        i: int,
        x: torch.Tensor,
        slots: torch.Tensor,
        group: torch.Tensor | None = None,
        out_tokens: int | None = None,
    ) -> torch.Tensor:
        """Block ``i``'s output for the rows ``x``.

        Args:
            i: block index.
            x: ``[R, N, D]`` tokens entering the block.
            slots: ``[R]`` slot per row (whose shared prompt the row sees).
            group: ``[R, L, D]`` per-row group prompt for this block, or ``None`` (shared prompt only).
            out_tokens: only the first ``out_tokens`` tokens' outputs are needed; the keys/values path then
                computes only those, the append path still every token.
        """
        block = self.blocks[i]
        if not self.fast[i]:
            prompts = [_per_row(self.bank.shared[:, i], slots)]
            return prompted_block(block, x, prompts if group is None else [*prompts, group])
        kvs = [self._shared_kv(i, slots)]
        if group is not None:
            kvs.append(prompt_kv(block, group.to(x.dtype)))
        return kv_prompted_block(block, x, kvs, out_tokens)


def pooled_tokens(model: VisionTransformer) -> int | None:
    """How many leading tokens ``pool_features`` reads: 1 for timm's own class-token pooling, ``None`` (every token)
    otherwise, including subclasses with a head of their own (distilled DeiT reads the distillation token too).

    Args:
        model: a timm VisionTransformer.
    """
    cls = type(model)
    # Older timm releases pool inside forward_head and have no ``pool`` method: both sides are then None.
    own_head = cls.forward_head is VisionTransformer.forward_head
    own_pool = getattr(cls, "pool", None) is getattr(VisionTransformer, "pool", None)
    token_pooled = getattr(model, "attn_pool", None) is None and getattr(model, "global_pool", None) == "token"
    return 1 if own_head and own_pool and token_pooled else None


def prompted_forward(
    model: VisionTransformer,
    images: torch.Tensor,
    bank: PromptBank,
    slots: torch.Tensor | None = None,
    append_prompts: bool = False,
) -> PromptedOutput:
    """LPT inference (and training forward) for a batch whose rows may belong to different tasks.

    Args:
        model: frozen timm VisionTransformer.
        images: ``[B, 3, H, W]`` preprocessed images.
        bank: stacked prompt tensors of one geometry.
        slots: ``[B]`` slot index per row; ``None`` means slot 0 for every row.
        append_prompts: run every block with the prompt tokens appended (the reference layout) instead of
            prompts as keys/values only; the result is the same up to float rounding.
    """
    batch = images.shape[0]
    if slots is None:
        slots = torch.zeros(batch, dtype=torch.long, device=images.device)
    share = bank.share_blocks
    depth = len(model.blocks)
    run_block = _BlockRunner(model.blocks, bank, append_prompts)

    # The last block's outputs are read only through the pooling: a class-token-pooled model needs one token's.
    out_tokens = [None] * (depth - 1) + [pooled_tokens(model)]

    x = embed(model, images)
    for i in range(share):
        x = run_block(i, x, slots)
    prefix = x  # blocks 0..S-1 are identical in the query and final pass: computed once.

    for i in range(share, depth):
        x = run_block(i, x, slots, out_tokens=out_tokens[i])
    query = pool_features(model, x)

    features = query
    key_sim = query.new_zeros(batch, dtype=torch.float32)
    kmax = int(bank.top_k[slots].max()) if batch else 0
    selected = torch.full((batch, kmax), -1, dtype=torch.long, device=images.device)
    has_pool = bank.pool_size[slots] > 0
    if kmax > 0:
        rows = has_pool.nonzero().squeeze(1) if not bool(has_pool.all()) else None
        r_slots = slots if rows is None else slots[rows]
        r_query = query if rows is None else query[rows]
        group, r_sim, r_sel = select_group_prompts(bank, r_slots, r_query)
        x = prefix if rows is None else prefix[rows]
        for i in range(share, depth):
            x = run_block(i, x, r_slots, group[:, i - share], out_tokens[i])
        r_features = pool_features(model, x)
        if rows is None:
            features, key_sim, selected = r_features, r_sim, r_sel
        else:
            features = query.index_copy(0, rows, r_features.to(query.dtype))
            key_sim = key_sim.index_copy(0, rows, r_sim)
            selected = selected.index_copy(0, rows, r_sel)
    logits = cosine_logits(bank, slots, features)
    return PromptedOutput(logits=logits, features=features, query=query, key_sim=key_sim, selected=selected)
