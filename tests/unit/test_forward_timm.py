"""``lpt.forward`` re-implements timm's ViT forward around the blocks to insert prompts. With no prompt tokens it
must be timm's own ``forward_features`` / ``forward_head``: this pins the prompt-free path to timm, so a timm
upgrade that changes the forward (pooling, norms, prefix tokens) fails here and not silently in accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from lpt.forward import PromptBank, embed, pool_features, prompted_forward

HEAD_SCALE = 20.0


def timm_pre_logits(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(images), pre_logits=True)


def avg_pooled_vit() -> VisionTransformer:
    """A second pooling layout: no class token reliance (average pooling, fc_norm) and register tokens."""
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=3, num_heads=2, global_pool="avg", reg_tokens=2, num_classes=0
    ).eval()


@pytest.fixture(params=["class_token", "avg_pool_registers"])
def model(request, backbone) -> VisionTransformer:
    return backbone.model if request.param == "class_token" else avg_pooled_vit()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_embed_blocks_and_pooling_are_timms_forward(model: VisionTransformer, images: torch.Tensor) -> None:
    with torch.inference_mode():
        x = embed(model, images)
        for block in model.blocks:
            x = block(x)
        ours = pool_features(model, x)
        theirs = timm_pre_logits(model, images)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_prompt_free_forward_is_timms_features_and_a_cosine_head(
    model: VisionTransformer, images: torch.Tensor
) -> None:
    depth, dim, classes = len(model.blocks), model.embed_dim, 5
    head = torch.randn(classes, dim, generator=torch.Generator().manual_seed(2))
    bank = PromptBank.from_tensors(torch.zeros(depth, 0, dim), head, share_blocks=1, head_scale=HEAD_SCALE)
    with torch.inference_mode():
        out = prompted_forward(model, images, bank)
        features = timm_pre_logits(model, images)
    # the prompted blocks run attention as their own scaled_dot_product_attention over q/k/v, not timm's call:
    # equal to float32 rounding (about 1e-6 on unit-scale features), not bit for bit
    torch.testing.assert_close(out.features, features, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.query, features, rtol=0, atol=1e-5)
    expected = HEAD_SCALE * F.normalize(features, dim=-1) @ F.normalize(head, dim=-1).T
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-5)
    assert (out.selected == -1).all() and (out.key_sim == 0).all()
