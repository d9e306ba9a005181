"""The ``lpt-prompt-set/1`` format: round trips, content hash, and every validation error with its code and field."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable

import pytest
import safetensors.torch
import torch

from lpt.backbone import BackboneInfo, load_backbone
from lpt.errors import PromptSetInvalid
from lpt.init import init_prompt_set
from lpt.prompt_set import (
    FORMAT,
    REQUIRED_META,
    PromptSet,
    ValidationLimits,
    decode,
    encode,
    load_and_validate,
    sha256,
    validate,
)

# test_vit at 32 px: depth 6, width 64. Sets below: L = 2, P = 4, S = 3, top_k = 2, C = 3.
DEPTH, DIM, L, P, S, C = 6, 64, 2, 4, 3, 3


@pytest.fixture(scope="module")
def info() -> BackboneInfo:
    return load_backbone("test_vit", weights="random:0", img_size=32).info


@pytest.fixture
def ps(info: BackboneInfo) -> PromptSet:
    return init_prompt_set(info, ["cat", "dog", "émeu"], prompt_length=L, pool_size=P, share_blocks=S, top_k=2)


def expect(code: str, field: str | None, fn: Callable[[], object]) -> PromptSetInvalid:
    """Assert ``fn`` raises PromptSetInvalid with exactly this code and field."""
    with pytest.raises(PromptSetInvalid) as err:
        fn()
    assert (err.value.code, err.value.field) == (code, field), str(err.value)
    return err.value


def tensors_of(ps: PromptSet) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in ps.tensors().items()}


def raw_file(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """A safetensors file with exactly these tensors and metadata (bypasses PromptSet/encode)."""
    return safetensors.torch.save(tensors, metadata=meta)


def hand_made(header: dict, payload: bytes = b"") -> bytes:
    """A safetensors-shaped file with an arbitrary JSON header (for headers safetensors.torch.save refuses)."""
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + payload


# ---------------------------------------------------------------- round trips and hash


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_values_dtype_and_metadata(ps: PromptSet, info: BackboneInfo, dtype: torch.dtype) -> None:
    for name in ("shared_prompt", "head_weight", "group_prompts", "group_keys"):
        setattr(ps, name, getattr(ps, name).to(dtype))
    ps.extra = {"metrics": json.dumps({"top1": 0.91}), "trained_by": "lpt-train 0.1"}
    back = load_and_validate(encode(ps), info)
    for name, tensor in ps.tensors().items():
        assert back.tensors()[name].dtype == dtype
        assert torch.equal(back.tensors()[name], tensor), name
    assert back.class_names == ["cat", "dog", "émeu"]
    assert (back.backbone, back.backbone_fingerprint) == (info.name, info.fingerprint)
    assert (back.share_blocks, back.top_k, back.head_scale) == (S, 2, 20.0)
    assert back.extra == ps.extra


def test_round_trip_without_pool(info: BackboneInfo) -> None:
    ps = init_prompt_set(info, ["a", "b"], prompt_length=L, pool_size=0, share_blocks=S)
    back = load_and_validate(encode(ps), info)
    assert back.group_prompts is None and back.group_keys is None and back.pool_size == 0
    assert set(back.tensors()) == {"shared_prompt", "head.weight"}


def test_zero_size_pool_in_file_means_no_pool(ps: PromptSet, info: BackboneInfo) -> None:
    tensors = tensors_of(ps)
    tensors["group_prompts"] = torch.zeros(0, DEPTH - S, L, DIM)
    tensors["group_keys"] = torch.zeros(0, DIM)
    back = load_and_validate(raw_file(tensors, ps.metadata()), info)
    assert back.pool_size == 0 and back.group_keys is None


def test_sha256_is_hex_digest_and_content_sensitive(ps: PromptSet) -> None:
    import hashlib

    data = encode(ps)
    assert sha256(data) == hashlib.sha256(data).hexdigest()
    ps.head_weight = ps.head_weight.clone()
    ps.head_weight[0, 0] += 1e-3
    assert sha256(encode(ps)) != sha256(data)


def test_encode_is_deterministic_so_sha256_is_stable(ps: PromptSet) -> None:
    ps.extra = {"metrics": "{}", "notes": "x", "z": "1"}
    digests = {sha256(encode(ps)) for _ in range(20)}
    assert len(digests) == 1


# ---------------------------------------------------------------- validation against the backbone


def test_valid_set_passes(ps: PromptSet, info: BackboneInfo) -> None:
    validate(ps, info)


def test_depth_mismatch(ps: PromptSet, info: BackboneInfo) -> None:
    ps.shared_prompt = torch.zeros(DEPTH - 1, L, DIM)
    expect("depth_mismatch", "shared_prompt", lambda: validate(ps, info))


def test_embed_dim_mismatch(ps: PromptSet, info: BackboneInfo) -> None:
    ps.shared_prompt = torch.zeros(DEPTH, L, DIM // 2)
    expect("embed_dim_mismatch", "shared_prompt", lambda: validate(ps, info))


def test_fingerprint_mismatch(ps: PromptSet, info: BackboneInfo) -> None:
    ps.backbone_fingerprint = "0" * 64
    err = expect("fingerprint_mismatch", "backbone_fingerprint", lambda: validate(ps, info))
    assert err.to_dict()["field"] == "backbone_fingerprint"


def test_fingerprint_of_another_seed_is_rejected(ps: PromptSet) -> None:
    other = load_backbone("test_vit", weights="random:1", img_size=32).info
    err = expect("fingerprint_mismatch", "backbone_fingerprint", lambda: validate(ps, other))
    assert err.message.startswith("backbone weights differ (same name and input size, test_vit)"), err.message


def test_another_input_size_is_named_as_the_difference(ps: PromptSet) -> None:
    other = load_backbone("test_vit", weights="random:0", img_size=48).info
    err = expect("fingerprint_mismatch", "backbone_input_size", lambda: validate(ps, other))
    assert "input size differs: this backbone is 3x48x48, the prompt set was trained on 3x32x32" in err.message


def test_another_model_name_is_named_as_the_difference(ps: PromptSet, info: BackboneInfo) -> None:
    ps.backbone, ps.backbone_fingerprint = "other_vit", "1" * 64
    err = expect("fingerprint_mismatch", "backbone", lambda: validate(ps, info))
    assert "name differs: this backbone is test_vit, the prompt set was trained on other_vit" in err.message


def test_backbone_input_size_round_trips_and_older_sets_without_it_still_load(ps: PromptSet, info) -> None:
    assert decode(encode(ps)).backbone_input_size == (3, 32, 32)
    assert "backbone_input_size" not in decode(encode(ps)).extra
    ps.backbone_input_size = None
    old = decode(encode(ps))
    assert old.backbone_input_size is None
    validate(old, info)
    old.backbone_fingerprint = "2" * 64  # without the size, a mismatch can only say "weights"
    expect("fingerprint_mismatch", "backbone_fingerprint", lambda: validate(old, info))


@pytest.mark.parametrize("bad", ["[3, 32]", "[3, 32, -1]", "[3.0, 32, 32]", "224", "not json"])
def test_malformed_backbone_input_size(ps: PromptSet, bad: str) -> None:
    meta = {**ps.metadata(), "backbone_input_size": bad}
    expect("bad_metadata", "backbone_input_size", lambda: decode(raw_file(tensors_of(ps), meta)))


SHAPE_CASES = {
    # name: (attribute, bad tensor, field)
    "shared_prompt rank 2": ("shared_prompt", torch.zeros(DEPTH, L * DIM), "shared_prompt"),
    "shared_prompt rank 4": ("shared_prompt", torch.zeros(1, DEPTH, L, DIM), "shared_prompt"),
    "head rank 1": ("head_weight", torch.zeros(C * DIM), "head.weight"),
    "head rank 3": ("head_weight", torch.zeros(1, C, DIM), "head.weight"),
    "head width": ("head_weight", torch.zeros(C, DIM + 1), "head.weight"),
    "pool rank 3": ("group_prompts", torch.zeros(P, DEPTH - S, L * DIM), "group_prompts"),
    "keys rank 1": ("group_keys", torch.zeros(P * DIM), "group_keys"),
    "pool blocks != depth - S": ("group_prompts", torch.zeros(P, DEPTH - S + 1, L, DIM), "group_prompts"),
    "pool L != shared L": ("group_prompts", torch.zeros(P, DEPTH - S, L + 1, DIM), "group_prompts"),
    "pool D != shared D": ("group_prompts", torch.zeros(P, DEPTH - S, L, DIM - 1), "group_prompts"),
    "keys count != pool size": ("group_keys", torch.zeros(P + 1, DIM), "group_keys"),
    "keys width != D": ("group_keys", torch.zeros(P, DIM + 1), "group_keys"),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_inconsistent_shapes(ps: PromptSet, info: BackboneInfo, case: str) -> None:
    attr, bad, field = SHAPE_CASES[case]
    setattr(ps, attr, bad)
    expect("bad_shape", field, lambda: validate(ps, info))


def test_prompt_length_zero_and_over_limit(ps: PromptSet, info: BackboneInfo) -> None:
    ps.shared_prompt = torch.zeros(DEPTH, 0, DIM)
    expect("bad_shape", "shared_prompt", lambda: validate(ps, info))
    ps.shared_prompt = torch.zeros(DEPTH, 5, DIM)
    expect("bad_shape", "shared_prompt", lambda: validate(ps, info, ValidationLimits(max_prompt_length=4)))


def test_pool_over_limit(ps: PromptSet, info: BackboneInfo) -> None:
    expect("bad_shape", "group_prompts", lambda: validate(ps, info, ValidationLimits(max_pool_size=P - 1)))
    validate(ps, info, ValidationLimits(max_pool_size=P))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    ("attr", "field"),
    [
        ("shared_prompt", "shared_prompt"),
        ("head_weight", "head.weight"),
        ("group_prompts", "group_prompts"),
        ("group_keys", "group_keys"),
    ],
)
def test_non_finite_values(ps: PromptSet, info: BackboneInfo, attr: str, field: str, value: float) -> None:
    bad = getattr(ps, attr).clone()
    bad.view(-1)[-1] = value  # the last element: a check that looks only at the start would miss it
    setattr(ps, attr, bad)
    expect("non_finite", field, lambda: validate(ps, info))


def test_non_finite_in_half_precision(ps: PromptSet, info: BackboneInfo) -> None:
    ps.group_keys = ps.group_keys.to(torch.bfloat16)
    ps.group_keys[1, 2] = float("nan")
    expect("non_finite", "group_keys", lambda: validate(ps, info))


def test_fewer_than_two_classes(info: BackboneInfo) -> None:
    ps = init_prompt_set(info, ["only"], prompt_length=L, pool_size=P, share_blocks=S)
    expect("too_few_classes", "head.weight", lambda: validate(ps, info))


def test_class_count_differs_from_class_names(ps: PromptSet, info: BackboneInfo) -> None:
    ps.class_names = ["cat", "dog"]
    expect("class_count_mismatch", "class_names", lambda: validate(ps, info))
    ps.class_names = ["a", "b", "c", "d"]
    expect("class_count_mismatch", "class_names", lambda: load_and_validate(encode(ps), info))


def test_too_many_classes(ps: PromptSet, info: BackboneInfo) -> None:
    expect("too_many_classes", "head.weight", lambda: validate(ps, info, ValidationLimits(max_classes=C - 1)))
    validate(ps, info, ValidationLimits(max_classes=C))


def test_class_name_too_long(ps: PromptSet, info: BackboneInfo) -> None:
    ps.class_names = ["a", "b", "x" * 11]
    expect("bad_metadata", "class_names", lambda: validate(ps, info, ValidationLimits(max_class_name_chars=10)))


@pytest.mark.parametrize("share_blocks", [-1, DEPTH, DEPTH + 3])
def test_bad_share_blocks(ps: PromptSet, info: BackboneInfo, share_blocks: int) -> None:
    ps.share_blocks = share_blocks
    expect("bad_share_blocks", "share_blocks", lambda: validate(ps, info))


@pytest.mark.parametrize("top_k", [0, -1, P + 1])
def test_bad_top_k(ps: PromptSet, info: BackboneInfo, top_k: int) -> None:
    ps.top_k = top_k
    expect("bad_top_k", "top_k", lambda: validate(ps, info))


@pytest.mark.parametrize("scale", [0.0, -20.0, float("nan"), float("inf")])
def test_bad_head_scale(ps: PromptSet, info: BackboneInfo, scale: float) -> None:
    ps.head_scale = scale
    expect("bad_metadata", "head_scale", lambda: validate(ps, info))
    expect("bad_metadata", "head_scale", lambda: load_and_validate(encode(ps), info))


def test_group_prompts_without_keys_in_memory(ps: PromptSet, info: BackboneInfo) -> None:
    ps.group_keys = None
    expect("missing_tensor", "group_keys", lambda: validate(ps, info))


def test_group_keys_without_prompts_in_memory(ps: PromptSet, info: BackboneInfo) -> None:
    ps.group_prompts = None
    expect("missing_tensor", "group_prompts", lambda: validate(ps, info))


# ---------------------------------------------------------------- decoding: container, tensors, metadata


@pytest.mark.parametrize(
    ("drop", "field"),
    [
        (["shared_prompt"], "shared_prompt"),
        (["head.weight"], "head.weight"),
        (["group_keys"], "group_keys"),  # only the pool present
        (["group_prompts"], "group_prompts"),  # only the keys present
    ],
)
def test_missing_tensors(ps: PromptSet, drop: list[str], field: str) -> None:
    tensors = {k: v for k, v in tensors_of(ps).items() if k not in drop}
    expect("missing_tensor", field, lambda: decode(raw_file(tensors, ps.metadata())))


def test_unknown_tensor(ps: PromptSet) -> None:
    tensors = {**tensors_of(ps), "head.bias": torch.zeros(C)}
    expect("unknown_tensor", "head.bias", lambda: decode(raw_file(tensors, ps.metadata())))


@pytest.mark.parametrize("fmt", ["lpt-prompt-set/2", "LPT-PROMPT-SET/1", "", "vpt"])
def test_wrong_format_string(ps: PromptSet, fmt: str) -> None:
    meta = {**ps.metadata(), "format": fmt}
    expect("bad_format", "format", lambda: decode(raw_file(tensors_of(ps), meta)))


def test_format_missing(ps: PromptSet) -> None:
    meta = {k: v for k, v in ps.metadata().items() if k != "format"}
    expect("bad_format", "format", lambda: decode(raw_file(tensors_of(ps), meta)))


def test_no_metadata_at_all(ps: PromptSet) -> None:
    expect("bad_format", "format", lambda: decode(safetensors.torch.save(tensors_of(ps))))


@pytest.mark.parametrize("key", [k for k in REQUIRED_META if k != "format"])
def test_missing_metadata(ps: PromptSet, key: str) -> None:
    meta = {k: v for k, v in ps.metadata().items() if k != key}
    expect("missing_metadata", key, lambda: decode(raw_file(tensors_of(ps), meta)))


@pytest.mark.parametrize("value", ['["a", "b"', "cat,dog,emu", '{"a": 1}', "[1, 2, 3]", '"abc"'])
def test_malformed_class_names(ps: PromptSet, value: str) -> None:
    meta = {**ps.metadata(), "class_names": value}
    expect("bad_metadata", "class_names", lambda: decode(raw_file(tensors_of(ps), meta)))


NON_NUMERIC = [("share_blocks", "three"), ("share_blocks", "3.0"), ("top_k", "2.5"), ("top_k", ""), ("head_scale", "x")]
OUT_OF_RANGE = [
    ("share_blocks", "-1", "bad_share_blocks"),
    ("share_blocks", str(DEPTH), "bad_share_blocks"),
    ("top_k", "0", "bad_top_k"),
    ("top_k", str(P + 1), "bad_top_k"),
    ("head_scale", "0", "bad_metadata"),
    ("head_scale", "nan", "bad_metadata"),
]


@pytest.mark.parametrize(("key", "value"), NON_NUMERIC)
def test_non_numeric_metadata(ps: PromptSet, key: str, value: str) -> None:
    meta = {**ps.metadata(), key: value}
    expect("bad_metadata", key, lambda: decode(raw_file(tensors_of(ps), meta)))


@pytest.mark.parametrize(("key", "value", "code"), OUT_OF_RANGE)
def test_out_of_range_metadata_from_file(ps: PromptSet, info: BackboneInfo, key: str, value: str, code: str) -> None:
    meta = {**ps.metadata(), key: value}
    expect(code, key, lambda: load_and_validate(raw_file(tensors_of(ps), meta), info))


def test_metadata_values_must_be_strings(ps: PromptSet) -> None:
    header = {"__metadata__": {"format": FORMAT, "top_k": 2}}
    expect("bad_metadata", "__metadata__", lambda: decode(hand_made(header)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.int64, torch.uint8])
@pytest.mark.parametrize("name", ["shared_prompt", "head.weight", "group_prompts", "group_keys"])
def test_disallowed_dtypes(ps: PromptSet, name: str, dtype: torch.dtype) -> None:
    tensors = tensors_of(ps)
    tensors[name] = tensors[name].to(dtype)
    expect("bad_dtype", name, lambda: decode(raw_file(tensors, ps.metadata())))


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"not a prompt set")
    return buf.getvalue()


NOT_SAFETENSORS = {
    "pickle of tensors": lambda ps: pickle.dumps(tensors_of(ps)),
    "pickle of a dict": lambda ps: pickle.dumps({"shared_prompt": [1.0, 2.0]}),
    "torch.save zip": lambda ps: _torch_save_bytes(tensors_of(ps)),
    "zip": lambda ps: _zip_bytes(),
    "empty": lambda ps: b"",
    "seven bytes": lambda ps: b"\x07" * 7,
    "truncated data": lambda ps: encode(ps)[:-16],
    "truncated header": lambda ps: encode(ps)[:40],
    "header length 2**40": lambda ps: struct.pack("<Q", 2**40) + b"{}" + b"\0" * 64,
    "header length past the end": lambda ps: struct.pack("<Q", 100) + b"{}",
    "header not JSON": lambda ps: struct.pack("<Q", 8) + b"{not js}",
    "header a JSON list": lambda ps: hand_made([1, 2]),  # type: ignore[arg-type]
    "text file": lambda ps: b"shared_prompt = [[0.1, 0.2]]\n" * 4,
}


def _torch_save_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(NOT_SAFETENSORS))
def test_not_safetensors_inputs(ps: PromptSet, info: BackboneInfo, case: str) -> None:
    data = NOT_SAFETENSORS[case](ps)
    expect("not_safetensors", None, lambda: load_and_validate(data, info))


WHAT_IT_LOOKS_LIKE = {
    "a JPEG image": lambda ps: _image_bytes("JPEG"),
    "a PNG image": lambda ps: _image_bytes("PNG"),
    "a WebP image": lambda ps: _image_bytes("WEBP"),
    "a ZIP archive": lambda ps: _torch_save_bytes(tensors_of(ps)),
    "a Python pickle": lambda ps: pickle.dumps(tensors_of(ps)),
    "a text file": lambda ps: b"shared_prompt = [[0.1, 0.2]]\n" * 4,
}


def _image_bytes(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("what", list(WHAT_IT_LOOKS_LIKE))
def test_a_non_safetensors_upload_is_named_by_what_it_looks_like(ps: PromptSet, info: BackboneInfo, what: str):
    err = expect("not_safetensors", None, lambda: load_and_validate(WHAT_IT_LOOKS_LIKE[what](ps), info))
    assert err.message.startswith(f"this looks like {what}"), err.message
    assert "header length" not in err.message


def test_a_real_file_is_never_sniffed_as_something_else(info: BackboneInfo) -> None:
    """A header of 128 bytes begins with 0x80, a pickle's first byte: the signature is asked only after failing."""
    for names in (["a", "b"], ["cat", "dog", "emu"], ["x" * 40, "y"]):
        for pad in range(16):
            ps = init_prompt_set(info, names, prompt_length=L, pool_size=0, share_blocks=S)
            ps.extra = {"pad": "p" * pad}
            data = encode(ps)
            assert decode(data).class_names == names


def test_decoding_never_unpickles(ps: PromptSet, info: BackboneInfo) -> None:
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("decode unpickled its input",))

    expect("not_safetensors", None, lambda: load_and_validate(pickle.dumps(Boom()), info))


def test_bad_tensor_data_offsets(ps: PromptSet) -> None:
    header = {
        "__metadata__": ps.metadata(),
        "shared_prompt": {"dtype": "F32", "shape": [DEPTH, L, DIM], "data_offsets": [0, 10**9]},
    }
    expect("not_safetensors", None, lambda: decode(hand_made(header, b"\0" * 64)))


def test_empty_pool_tensors_validate_as_no_pool(info: BackboneInfo) -> None:
    """decode() reads a zero-size pool as no pool; validate() must agree for in-memory sets."""
    ps = init_prompt_set(info, ["a", "b"], prompt_length=2, pool_size=0, share_blocks=3)
    ps.group_prompts = torch.zeros(0, info.depth - 3, 2, info.embed_dim)
    ps.group_keys = torch.zeros(0, info.embed_dim)
    validate(ps, info)
    assert ps.pool_size == 0
