"""Prompts as keys/values only, per kind of timm ViT block: exact where supported, the append path elsewhere."""

from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock, VisionTransformer

from lpt.backbone import load_backbone
from lpt.forward import PromptBank, pooled_tokens, precompute_shared_kv, prompted_forward
from lpt.init import init_prompt_set
from lpt.prompt_kv import kv_prompted_block, kv_structure_supported, prompt_kv, uses_prompt_kv
from lpt.prompt_set import PromptSet
from lpt.reference import two_pass_batched
from prompts_store.base import StoredVersion
from service.engine import Engine
from service.resident import make_resident

ATOL = 1e-4  # float32 logits on the head_scale (20) scale
DEPTH, DIM, L, S = 4, 32, 3, 2
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": DIM, "depth": DEPTH, "num_heads": 2, "num_classes": 0}

SUPPORTED = {
    "qkv_bias": {"qkv_bias": True},
    "no_qkv_bias": {"qkv_bias": False},
    "qk_norm": {"qk_norm": True},
    "layer_scale": {"init_values": 0.5},
    "register_tokens": {"reg_tokens": 3},
}
ALL_TOKEN_POOLS = {"avg_pool": {"global_pool": "avg", "class_token": False}, "map_pool": {"global_pool": "map"}}
FALLBACK = {
    "res_post_block": {"block_fn": ResPostBlock},
    "parallel_scaling_block": {"block_fn": ParallelScalingBlock},
    "diff_attention": {"attn_layer": "diff"},
}


def tiny_vit(**kind) -> VisionTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformer(**{**TINY, **kind})
    # random LayerNorm affines and biases, so a norm or bias handled wrongly shows in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval().requires_grad_(False)


def prompt_set(seed: int, classes: int = 5, pool: int = 4, top_k: int = 2) -> PromptSet:
    gen = torch.Generator().manual_seed(seed)
    return PromptSet(
        shared_prompt=torch.randn(DEPTH, L, DIM, generator=gen),
        head_weight=torch.randn(classes, DIM, generator=gen),
        class_names=[f"c{i}" for i in range(classes)],
        backbone="tiny",
        backbone_fingerprint="0" * 64,
        share_blocks=S,
        top_k=top_k,
        group_prompts=torch.randn(pool, DEPTH - S, L, DIM, generator=gen) if pool else None,
        group_keys=torch.randn(pool, DIM, generator=gen) if pool else None,
    )


def mlp_token_counts(model: VisionTransformer, fn) -> tuple[list[tuple[int, int]], object]:
    """(block index, tokens) for every call of a block's MLP during ``fn()`` (the real tokens on the keys/values
    path, more when appended, the class token alone in a token-pooled model's last block) and what ``fn()``
    returned.

    The hooks sit on the MLP (the fused input projection of a parallel block), not on the block: hooks on a
    block send it down the append path by design.
    """
    seen: list[tuple[int, int]] = []
    mlps = [getattr(b, "mlp", None) or b.in_proj for b in model.blocks]

    def hook(i: int):
        return lambda _m, args, _o: seen.append((i, args[0].shape[1]))

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(mlps)]
    try:
        result = fn()
    finally:
        for h in handles:
            h.remove()
    return seen, result


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(SUPPORTED), ids=list(SUPPORTED))
def test_supported_kind_matches_two_pass_and_skips_prompt_tokens(kind: str, images: torch.Tensor) -> None:
    model = tiny_vit(**SUPPORTED[kind])
    assert all(uses_prompt_kv(b) for b in model.blocks)
    sets = [prompt_set(seed) for seed in (1, 2)] + [prompt_set(3, pool=0)]
    kvs = [precompute_shared_kv(model, ps) for ps in sets]
    slots = torch.tensor([0, 1, 2, 1, 0, 2])
    with torch.inference_mode():
        ref = [two_pass_batched(model, images[slots == j], ps) for j, ps in enumerate(sets)]
        for shared_kv in (None, kvs):  # on the fly (trainer) and precomputed (service)
            bank = PromptBank.stack(sets, shared_kv=shared_kv)
            tokens, out = mlp_token_counts(model, lambda bank=bank: prompted_forward(model, images, bank, slots))
            n = model.patch_embed.num_patches + model.num_prefix_tokens
            assert {t for i, t in tokens if i < DEPTH - 1} == {n}
            assert {t for i, t in tokens if i == DEPTH - 1} == {1}  # the pooling reads the class token alone
            for j, ps in enumerate(sets):
                got = out.logits[slots == j, : ps.num_classes]
                assert (got - ref[j]).abs().max() <= ATOL, (kind, j, shared_kv is not None)


@pytest.mark.parametrize("kind", list(ALL_TOKEN_POOLS), ids=list(ALL_TOKEN_POOLS))
def test_models_pooling_every_token_compute_every_token_of_the_last_block(kind: str, images: torch.Tensor) -> None:
    model = tiny_vit(**ALL_TOKEN_POOLS[kind])
    assert all(uses_prompt_kv(b) for b in model.blocks)
    bank = PromptBank.stack([prompt_set(9)])
    with torch.inference_mode():
        tokens, out = mlp_token_counts(model, lambda: prompted_forward(model, images, bank))
        ref = prompted_forward(model, images, bank, append_prompts=True)  # the reference layout, every token
    assert {t for _, t in tokens} == {model.patch_embed.num_patches + model.num_prefix_tokens}
    assert (out.logits - ref.logits).abs().max() <= ATOL


def test_distilled_deit_reads_two_tokens_so_its_last_block_computes_every_token(images: torch.Tensor) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformerDistilled(**{**TINY, "num_classes": 5}).eval().requires_grad_(False)
    assert pooled_tokens(model) is None  # its head averages the class and the distillation token
    bank = PromptBank.stack([prompt_set(10)])
    with torch.inference_mode():
        tokens, out = mlp_token_counts(model, lambda: prompted_forward(model, images, bank))
        ref = prompted_forward(model, images, bank, append_prompts=True)
    assert {t for _, t in tokens} == {model.patch_embed.num_patches + model.num_prefix_tokens}
    assert (out.logits - ref.logits).abs().max() <= ATOL


@pytest.mark.parametrize("out_tokens", [1, 3])
def test_a_block_computing_leading_tokens_only_equals_the_whole_blocks_leading_rows(
    out_tokens: int, images: torch.Tensor
) -> None:
    model = tiny_vit(qk_norm=True, init_values=0.5, reg_tokens=2)
    block = model.blocks[-1]
    x = torch.randn(len(images), 20, DIM, generator=torch.Generator().manual_seed(11))
    kv = prompt_kv(block, torch.randn(len(images), L, DIM, generator=torch.Generator().manual_seed(12)))
    with torch.inference_mode():
        whole = kv_prompted_block(block, x, [kv])
        leading = kv_prompted_block(block, x, [kv], out_tokens)
    assert leading.shape == (len(images), out_tokens, DIM)
    torch.testing.assert_close(leading, whole[:, :out_tokens], atol=1e-5, rtol=0)


def test_fused_and_manual_timm_attention_give_the_same_logits(images: torch.Tensor) -> None:
    model = tiny_vit(qk_norm=True)
    ps = prompt_set(4)
    with torch.inference_mode():
        fast = prompted_forward(model, images, PromptBank.stack([ps])).logits
        for block in model.blocks:
            block.attn.fused_attn = False  # timm's own attention then runs its explicit softmax
        ref = two_pass_batched(model, images, ps)
    assert (fast - ref).abs().max() <= ATOL


@pytest.mark.parametrize("kind", list(FALLBACK), ids=list(FALLBACK))
def test_unsupported_block_kind_falls_back_to_appended_tokens(kind: str, images: torch.Tensor) -> None:
    model = tiny_vit(**FALLBACK[kind])
    assert not any(kv_structure_supported(b) for b in model.blocks)
    ps = prompt_set(5)
    assert precompute_shared_kv(model, ps).nbytes == 0
    with torch.inference_mode():
        tokens, out = mlp_token_counts(model, lambda: prompted_forward(model, images, PromptBank.stack([ps])))
        ref = two_pass_batched(model, images, ps)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    assert min(t for _, t in tokens) > n  # every block saw prompt tokens appended
    assert (out.logits - ref).abs().max() <= ATOL


def test_attention_dropout_in_training_takes_the_append_path(images: torch.Tensor) -> None:
    model = tiny_vit(attn_drop_rate=0.2)
    assert all(uses_prompt_kv(b) for b in model.blocks)  # eval: dropout is off
    model.train()
    assert not any(uses_prompt_kv(b) for b in model.blocks)
    bank = PromptBank.stack([prompt_set(6)])
    runs = []
    for append in (False, True):
        torch.manual_seed(7)  # same dropout draws: both must be the very same append computation
        runs.append(prompted_forward(model, images, bank, append_prompts=append).logits)
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)


def test_precomputed_kv_is_what_the_forward_reads(images: torch.Tensor) -> None:
    model = tiny_vit()
    ps = prompt_set(8, pool=0)
    kv = precompute_shared_kv(model, ps)
    assert kv.kv.shape == (DEPTH, 2, 2, L, DIM // 2)
    assert kv.nbytes == 2 * DEPTH * L * DIM * 4
    with torch.inference_mode():
        good = prompted_forward(model, images, PromptBank.stack([ps], shared_kv=[kv])).logits
        wrong = type(kv)(kv.kv * 0)
        bad = prompted_forward(model, images, PromptBank.stack([ps], shared_kv=[wrong])).logits
    assert (good - two_pass_batched(model, images, ps)).abs().max() <= ATOL
    assert (bad - good).abs().max() > 1e-2


def test_resident_sets_carry_count_and_serve_their_shared_kv(images: torch.Tensor) -> None:
    backbone = load_backbone("test_vit", weights="random:0", img_size=32)
    info = backbone.info
    sets = [init_prompt_set(info, ["a", "b", "c"], 2, pool_size=p, share_blocks=3, seed=p) for p in (3, 0)]
    for ps in sets:  # VPT-init prompts are tiny; scaled so that wrong keys/values visibly move the answer
        ps.shared_prompt = ps.shared_prompt * 20
    versions = [StoredVersion("t", f"k{i}", 1, "", 0, 0.0) for i in range(len(sets))]
    entries = [make_resident(v, ps, "cpu", torch.float32, backbone.model) for v, ps in zip(versions, sets, strict=True)]
    for entry, ps in zip(entries, sets, strict=True):
        assert entry.bank.shared_kv is not None
        assert entry.nbytes == ps.nbytes + 2 * info.depth * ps.prompt_length * info.embed_dim * 4
    engine = Engine(backbone, "cpu", torch.float32)
    slots = torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.inference_mode():
        ref = prompted_forward(backbone.model, images, PromptBank.stack(sets), slots, append_prompts=True)
    ref_probs = ref.logits.softmax(-1)
    mixed = torch.stack(engine.infer(images, [entries[int(s)] for s in slots]))
    alone = torch.stack(engine.infer(images[:1], entries[:1]))
    torch.testing.assert_close(mixed, ref_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, ref_probs[:1], atol=1e-5, rtol=0)
    with torch.inference_mode():  # the bank views the same storage: the engine must be reading it
        for entry in entries:
            entry.shared_kv.kv.zero_()
    assert (torch.stack(engine.infer(images, [entries[int(s)] for s in slots])) - mixed).abs().max() > 1e-3
    assert (torch.stack(engine.infer(images[:1], entries[:1])) - alone).abs().max() > 1e-3
