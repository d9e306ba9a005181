"""Backbone loading: real weights, fingerprints, eval transform, weight files, errors, frozen eval mode."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from bench.real_data import DEIT_WEIGHTS as DEIT_FILE
from bench.real_data import missing
from lpt.backbone import Backbone, describe_mismatch, fingerprint, load_backbone, mismatched_field
from lpt.errors import BackboneError

# sha256 over the model name and every state-dict tensor (sorted keys, little-endian bytes): the same on every
# machine for these weights. It changes only if the file, the digest recipe or timm's module layout changes.
DEIT_FINGERPRINT = "379e414fdead9e2d563b12f95990964def9a22aa70a8f5a409cd9caf3be5ad6b"

needs_deit = pytest.mark.skipif(missing(DEIT_FILE) is not None, reason=missing(DEIT_FILE) or "")


def tiny(weights: str = "random:0", img_size: int = 32) -> Backbone:
    return load_backbone("test_vit", weights=weights, img_size=img_size)


@pytest.fixture(scope="module")
def deit() -> Backbone:
    if reason := missing(DEIT_FILE):
        pytest.skip(reason)
    return load_backbone("deit_tiny_patch16_224", weights=str(DEIT_FILE))


@needs_deit
def test_deit_tiny_file_loads_with_its_recorded_fingerprint(deit: Backbone) -> None:
    info = deit.info
    assert (info.depth, info.embed_dim, info.num_patches, info.patch_size) == (12, 192, 196, 16)
    assert info.input_size == (3, 224, 224)
    assert info.num_params == 5_717_416 - 192 * 1000 - 1000  # the file's parameters less the ImageNet head
    assert not info.random_weights and info.weights == DEIT_FILE.name
    assert info.fingerprint == DEIT_FINGERPRINT


@needs_deit
def test_deit_tiny_fingerprint_same_on_second_load(deit: Backbone) -> None:
    again = load_backbone("deit_tiny_patch16_224", weights=str(DEIT_FILE))
    assert again.info.fingerprint == deit.info.fingerprint == fingerprint("deit_tiny_patch16_224", again.model)


@needs_deit
def test_deit_tiny_weights_are_the_files_values(deit: Backbone) -> None:
    stored = safetensors.torch.load_file(str(DEIT_FILE))
    own = deit.model.state_dict()
    for key in ("cls_token", "pos_embed", "blocks.11.mlp.fc2.weight", "norm.weight"):
        assert torch.equal(own[key], stored[key]), key


def test_random_same_seed_same_fingerprint() -> None:
    assert tiny("random:0").info.fingerprint == tiny("random:0").info.fingerprint


def test_random_different_seed_different_fingerprint() -> None:
    assert tiny("random:0").info.fingerprint != tiny("random:1").info.fingerprint


def test_fingerprint_depends_on_name_and_every_value() -> None:
    bb = tiny("random:0")
    base = fingerprint("test_vit", bb.model)
    assert fingerprint("test_vit_other_name", bb.model) != base
    with torch.no_grad():
        bb.model.blocks[-1].mlp.fc2.bias[-1] += 1e-6
    assert fingerprint("test_vit", bb.model) != base


def test_random_weights_are_announced_and_leave_global_rng_alone(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="lpt.backbone"):
        bb = tiny("random:7")
    assert torch.equal(torch.rand(3), expected)
    assert bb.info.random_weights and bb.info.weights == "random:7"
    assert any("RANDOM" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("img_size", [32, 48])
def test_eval_transform_is_timms_and_follows_img_size(img_size: int) -> None:
    bb = tiny(img_size=img_size)
    assert bb.info.input_size == (3, img_size, img_size)
    assert tuple(bb.model.patch_embed.img_size) == (img_size, img_size)
    image = Image.new("RGB", (71, 53), color=(255, 128, 0))
    out = bb.eval_transform(image)
    assert out.shape == (3, img_size, img_size)
    # a flat image normalises to (value - mean) / std per channel
    mean, std = torch.tensor(bb.info.mean), torch.tensor(bb.info.std)
    expected = (torch.tensor([255, 128, 0]) / 255 - mean) / std
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-2)
    theirs = timm.data.create_transform(**bb.info.data_config, is_training=False)
    assert torch.equal(theirs(image), out)


@needs_deit
def test_deit_eval_transform_reads_timms_config(deit: Backbone) -> None:
    cfg = timm.data.resolve_model_data_config(deit.model)
    assert deit.info.mean == tuple(cfg["mean"]) and deit.info.std == tuple(cfg["std"])
    assert (deit.info.interpolation, deit.info.crop_pct) == (cfg["interpolation"], cfg["crop_pct"])
    assert deit.eval_transform(Image.new("RGB", (300, 260))).shape == (3, 224, 224)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_a_local_weights_file(tmp_path: Path, suffix: str) -> None:
    source = tiny("random:3")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.model.state_dict(), path)
    else:
        safetensors.torch.save_file(source.model.state_dict(), str(path))
    loaded = tiny(str(path))
    assert loaded.info.fingerprint == source.info.fingerprint != tiny("random:0").info.fingerprint
    assert not loaded.info.random_weights and loaded.info.weights == path.name


def test_local_file_at_another_img_size_resamples_position_embeddings(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save(tiny("random:3", img_size=32).model.state_dict(), path)
    loaded = tiny(str(path), img_size=48)
    assert loaded.model.pos_embed.shape[1] == 1 + (48 // 16) ** 2
    assert loaded.info.input_size == (3, 48, 48)


@pytest.mark.parametrize(
    ("weights", "code", "field"),
    [
        ("{tmp}/missing.pth", "weights_not_found", "backbone_weights"),
        ("{tmp}/junk.pth", "backbone_load_failed", "backbone"),
        ("{tmp}/junk.safetensors", "backbone_load_failed", "backbone"),
        ("random:abc", "bad_weights_spec", "backbone_weights"),
        ("random:", "bad_weights_spec", "backbone_weights"),
    ],
)
def test_bad_weights_give_a_coded_error(tmp_path: Path, weights: str, code: str, field: str) -> None:
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint" * 8)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(BackboneError) as err:
        tiny(weights.format(tmp=tmp_path))
    assert (err.value.code, err.value.field) == (code, field)


def test_unknown_model_name() -> None:
    with pytest.raises(BackboneError) as err:
        load_backbone("no_such_model_xyz", weights="random:0")
    assert err.value.code == "backbone_load_failed"


def test_non_vit_model_is_rejected() -> None:
    with pytest.raises(BackboneError) as err:
        load_backbone("resnet18", weights="random:0")
    assert err.value.code == "unsupported_backbone"


def test_frozen_and_in_eval_mode() -> None:
    model = tiny().model
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    out = model(torch.randn(2, 3, 32, 32))
    assert not out.requires_grad


def test_describe_mismatch_names_the_field_that_differs() -> None:
    base = tiny().info.to_dict()
    other_size = tiny(img_size=48).info.to_dict()
    other_weights = tiny("random:1").info.to_dict()
    other_name = {**base, "name": "vit_small_patch16_224", "fingerprint": "f" * 64}
    assert mismatched_field(base, base) is None and describe_mismatch(base, base) == ""
    assert mismatched_field(base, other_size) == "input_size"
    assert describe_mismatch(base, other_size, "the service runs", "you trained on") == (
        "backbone input size differs: the service runs 3x32x32, you trained on 3x48x48 (both test_vit)"
    )
    assert mismatched_field(base, other_weights) == "fingerprint"
    message = describe_mismatch(base, other_weights)
    assert message.startswith("backbone weights differ (same name and input size, test_vit): expected fingerprint")
    assert "weights 'random:0' vs 'random:1'" in message
    assert mismatched_field(base, other_name) == "name"
    assert describe_mismatch(base, other_name) == "backbone name differs: expected test_vit, got vit_small_patch16_224"
    # A side without an input size (an older prompt set) is compared on name and fingerprint only.
    no_size = {k: v for k, v in other_size.items() if k != "input_size"}
    assert mismatched_field(base, no_size) == "fingerprint"
    assert describe_mismatch(base, no_size).startswith("backbone weights or input size differ (same name, test_vit)")
