"""The prompted forward against the plainly written two-pass reference: single task, mixed tasks, P = 0, modes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from lpt.backbone import Backbone
from lpt.forward import PromptBank, precompute_shared_kv, prompted_forward
from lpt.prompt_set import PromptSet
from lpt.reference import two_pass_batched, two_pass_reference
from tests.support.prompt_sets import L, S, make_set

ATOL = 1e-5  # float32, logits on the head_scale (20) scale


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# (classes, pool size, top_k): different class counts, pool sizes and top-k, some without a pool
MIXED = [(5, 4, 2), (2, 0, 1), (10, 6, 3), (3, 1, 1), (7, 0, 1), (4, 4, 4), (12, 8, 2), (2, 3, 1), (6, 2, 2)]


@pytest.fixture(scope="module")
def mixed_sets(backbone: Backbone) -> list[PromptSet]:
    return [make_set(backbone.info, classes=c, pool=p, top_k=k, seed=10 + i) for i, (c, p, k) in enumerate(MIXED)]


def run(backbone: Backbone, images: torch.Tensor, bank: PromptBank, slots: list[int] | None = None):
    slot_tensor = None if slots is None else torch.tensor(slots)
    with torch.inference_mode():
        return prompted_forward(backbone.model, images, bank, slot_tensor)


def test_single_task_matches_two_pass_reference(backbone: Backbone, images: torch.Tensor) -> None:
    ps = make_set(backbone.info, classes=5, pool=4, top_k=2, seed=1)
    out = run(backbone, images, PromptBank.stack([ps]))
    with torch.inference_mode():
        ref = two_pass_reference(backbone.model, images, ps)
        batched = two_pass_batched(backbone.model, images, ps)
    assert out.logits.shape == (12, 5)
    torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(batched, ref, atol=ATOL, rtol=0)
    # the group prompts matter: dropping the pool changes the answer (so the comparison can fail)
    ps.group_prompts = ps.group_keys = None
    assert (run(backbone, images, PromptBank.stack([ps])).logits - ref).abs().max() > 1e-2


def test_selection_and_key_sim_follow_the_published_matching(backbone: Backbone, images: torch.Tensor) -> None:
    ps = make_set(backbone.info, classes=3, pool=6, top_k=3, seed=2)
    out = run(backbone, images, PromptBank.stack([ps]))
    sim = F.cosine_similarity(out.query[:, None], ps.group_keys[None], dim=-1)  # [B, P]
    top = sim.topk(3, dim=1)
    assert torch.equal(out.selected, top.indices)
    torch.testing.assert_close(out.key_sim, top.values.sum(dim=1), atol=1e-6, rtol=0)


def test_from_tensors_single_slot_equals_stack(backbone: Backbone, images: torch.Tensor) -> None:
    ps = make_set(backbone.info, classes=4, pool=3, top_k=2, seed=3)
    bank = PromptBank.from_tensors(ps.shared_prompt, ps.head_weight, S, ps.group_prompts, ps.group_keys, top_k=2)
    torch.testing.assert_close(
        run(backbone, images, bank).logits, run(backbone, images, PromptBank.stack([ps])).logits, atol=ATOL, rtol=0
    )


def test_mixed_batch_matches_reference_per_row(
    backbone: Backbone, images: torch.Tensor, mixed_sets: list[PromptSet]
) -> None:
    slots = [0, 1, 2, 3, 4, 5, 6, 7, 8, 2, 0, 6]  # all 9 tasks, some twice, P = 0 rows between pooled ones
    out = run(backbone, images, PromptBank.stack(mixed_sets), slots)
    cmax = max(c for c, _, _ in MIXED)
    assert out.logits.shape == (len(slots), cmax)
    with torch.inference_mode():
        for row, slot in enumerate(slots):
            ps = mixed_sets[slot]
            ref = two_pass_reference(backbone.model, images[row : row + 1], ps)[0]
            torch.testing.assert_close(out.logits[row, : ps.num_classes], ref, atol=ATOL, rtol=0, msg=f"row {row}")
            assert torch.isneginf(out.logits[row, ps.num_classes :]).all(), f"row {row} padding is not -inf"
            assert (out.selected[row] >= 0).sum() == (ps.top_k if ps.pool_size else 0)
            if not ps.pool_size:
                assert out.key_sim[row] == 0 and torch.equal(out.features[row], out.query[row])


def test_mixed_row_equals_row_run_alone(backbone: Backbone, images: torch.Tensor, mixed_sets: list[PromptSet]) -> None:
    slots = [8, 7, 6, 5, 4, 3, 2, 1, 0, 5, 2, 2]
    bank = PromptBank.stack(mixed_sets)
    together = run(backbone, images, bank, slots)
    for row, slot in enumerate(slots):
        same_bank = run(backbone, images[row : row + 1], bank, [slot])
        own_bank = run(backbone, images[row : row + 1], PromptBank.stack([mixed_sets[slot]]))
        c = mixed_sets[slot].num_classes
        torch.testing.assert_close(together.logits[row], same_bank.logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(together.logits[row, :c], own_bank.logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(together.key_sim[row], own_bank.key_sim[0], atol=1e-6, rtol=0)
        k = own_bank.selected.shape[1]
        assert torch.equal(together.selected[row, :k], own_bank.selected[0])
        assert (together.selected[row, k:] == -1).all()


def test_shared_prompt_only_sets(backbone: Backbone, images: torch.Tensor) -> None:
    sets = [make_set(backbone.info, classes=c, pool=0, top_k=1, seed=20 + c) for c in (2, 5, 3)]
    slots = [i % 3 for i in range(len(images))]
    out = run(backbone, images, PromptBank.stack(sets), slots)
    assert out.selected.shape == (len(images), 0)
    assert torch.equal(out.features, out.query) and not out.key_sim.any()
    with torch.inference_mode():
        for row, slot in enumerate(slots):
            ref = two_pass_reference(backbone.model, images[row : row + 1], sets[slot])[0]
            torch.testing.assert_close(out.logits[row, : sets[slot].num_classes], ref, atol=ATOL, rtol=0)


def _count_block_runs(backbone: Backbone, images: torch.Tensor, bank: PromptBank) -> Counter[int]:
    """Block runs (MLP calls: hooks on a block itself would send it down the append path) per token count."""
    tokens: list[int] = []
    mlps = [b.mlp for b in backbone.model.blocks]
    handles = [m.register_forward_hook(lambda _m, args, _o: tokens.append(args[0].shape[1])) for m in mlps]
    try:
        run(backbone, images, bank)
    finally:
        for h in handles:
            h.remove()
    return Counter(tokens)


def test_prefix_blocks_run_once_and_pool_free_sets_take_one_pass(backbone: Backbone, images: torch.Tensor) -> None:
    depth = len(backbone.model.blocks)
    real_tokens = backbone.info.num_patches + backbone.info.num_prefix_tokens
    pooled = make_set(backbone.info, classes=3, pool=4, top_k=2, seed=4)
    plain = make_set(backbone.info, classes=3, pool=0, top_k=1, seed=4)
    # prompts enter as keys/values only: the MLPs see the real tokens and nothing else, and each pass's last block
    # the class token alone (the only token the pooling reads)
    pooled_runs = _count_block_runs(backbone, images, PromptBank.stack([pooled]))
    assert pooled_runs == {real_tokens: depth + (depth - S) - 2, 1: 2}
    assert _count_block_runs(backbone, images, PromptBank.stack([plain])) == {real_tokens: depth - 1, 1: 1}


def test_append_path_equals_keys_values_path_with_and_without_precomputed_kv(
    backbone: Backbone, images: torch.Tensor, mixed_sets: list[PromptSet]
) -> None:
    slots = torch.arange(len(images)) % len(mixed_sets)
    kvs = [precompute_shared_kv(backbone.model, ps) for ps in mixed_sets]
    with torch.inference_mode():
        appended = prompted_forward(backbone.model, images, PromptBank.stack(mixed_sets), slots, append_prompts=True)
        for bank in (PromptBank.stack(mixed_sets), PromptBank.stack(mixed_sets, shared_kv=kvs)):
            fast = prompted_forward(backbone.model, images, bank, slots)
            torch.testing.assert_close(fast.logits, appended.logits, atol=ATOL, rtol=0)
            assert torch.equal(fast.selected, appended.selected)


def test_inference_mode_equals_no_grad(backbone: Backbone, images: torch.Tensor, mixed_sets: list[PromptSet]) -> None:
    bank, slots = PromptBank.stack(mixed_sets), torch.arange(len(images)) % len(mixed_sets)
    with torch.inference_mode():
        a = prompted_forward(backbone.model, images, bank, slots)
    assert a.logits.is_inference()
    with torch.no_grad():
        b = prompted_forward(backbone.model, images, bank, slots)
    assert torch.equal(a.logits, b.logits)


def test_gradients_reach_every_trainable_part_and_not_the_backbone(backbone: Backbone, images: torch.Tensor) -> None:
    ps = make_set(backbone.info, classes=4, pool=5, top_k=2, seed=5)
    shared, pool, keys, head = (
        t.clone().requires_grad_() for t in (ps.shared_prompt, ps.group_prompts, ps.group_keys, ps.head_weight)
    )
    bank = PromptBank.from_tensors(shared, head, S, pool, keys, top_k=2)
    out = prompted_forward(backbone.model, images, bank)
    labels = torch.arange(len(images)) % 4
    loss = F.cross_entropy(out.logits, labels) - 0.5 * out.key_sim.mean()
    loss.backward()
    for name, t in {"shared": shared, "pool": pool, "keys": keys, "head": head}.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    # only the selected group prompts receive gradient
    used = out.selected.unique()
    unused = [i for i in range(5) if i not in used.tolist()]
    assert all(pool.grad[i].abs().sum() == 0 for i in unused)
    assert all(p.grad is None for p in backbone.model.parameters())


def test_trainer_gradients_equal_on_keys_values_and_append_paths(backbone: Backbone, images: torch.Tensor) -> None:
    ps = make_set(backbone.info, classes=4, pool=5, top_k=2, seed=9)
    labels = torch.arange(len(images)) % 4
    grads = []
    for append in (False, True):
        tensors = (ps.shared_prompt, ps.group_prompts, ps.group_keys, ps.head_weight)
        params = [t.clone().requires_grad_() for t in tensors]
        shared, pool, keys, head = params
        out = prompted_forward(
            backbone.model, images, PromptBank.from_tensors(shared, head, S, pool, keys, top_k=2), append_prompts=append
        )
        (F.cross_entropy(out.logits, labels) - 0.5 * out.key_sim.mean()).backward()  # the trainer's loss
        grads.append([p.grad for p in params])
    for name, fast, ref in zip(("shared", "pool", "keys", "head"), *grads, strict=True):
        assert ref.abs().sum() > 0, name
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_on_cpu_stays_close_to_float32(
    backbone: Backbone, images: torch.Tensor, mixed_sets: list[PromptSet]
) -> None:
    bank, slots = PromptBank.stack(mixed_sets), torch.arange(len(images)) % len(mixed_sets)
    with torch.inference_mode():
        ref = prompted_forward(backbone.model, images, bank, slots)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = prompted_forward(backbone.model, images, bank, slots)
    assert low.logits.dtype == torch.float32
    finite = torch.isfinite(ref.logits)
    assert torch.equal(finite, torch.isfinite(low.logits))
    # bf16 keeps ~3 significant digits; logits live on the +-20 scale
    assert (low.logits[finite] - ref.logits[finite]).abs().mean() < 0.5
    assert (low.logits.argmax(1) == ref.logits.argmax(1)).float().mean() >= 0.75


def test_stack_rejects_mixed_geometries(backbone: Backbone) -> None:
    base = make_set(backbone.info, classes=3, pool=2, top_k=1, seed=6)
    other_length = make_set(backbone.info, classes=3, pool=2, top_k=1, seed=6, prompt_length=L + 1)
    other_share = make_set(backbone.info, classes=3, pool=2, top_k=1, seed=6, share_blocks=S + 1)
    for other in (other_length, other_share):
        with pytest.raises(ValueError, match="geometry"):
            PromptBank.stack([base, other])
    with pytest.raises(ValueError):
        PromptBank.stack([])
    assert PromptBank.stack([base, base]).geometry == (L, S)
