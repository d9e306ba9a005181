"""Hostile prompt-set uploads. Each is a 422 with a code, and nothing is stored: the task list, the
versions and the active version are exactly as before. A pickle payload never runs."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from lpt.backbone import describe_mismatch, load_backbone, mismatched_field
from lpt.prompt_set import encode
from tests.support.images import jpeg_bytes
from tests.support.prompt_sets import make_set, prompt_bytes
from tests.support.service_app import error_code, make_config, serve_in_thread

KEEP = "keep"  # a task that exists: uploads over it must not change it
FRESH = "fresh"  # a task that does not exist: a failed upload must not create it


@pytest.fixture(scope="module")
def served(backbone, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("prompts"))
    with serve_in_thread(config, backbone) as s:
        r = s.post(f"/v1/prompts?task={KEEP}", content=prompt_bytes(backbone.info, seed=1))
        assert r.status_code == 201, r.text
        yield s


def store_view(served) -> dict:
    store = served.state.store
    tasks = store.list_tasks("default")
    return {
        "tasks": tasks,
        "versions": {t: [(v.version, v.sha256) for v in store.list_versions("default", t)] for t in tasks},
        "active": {t: store.active_version("default", t).version for t in tasks},
        "api": served.get("/v1/prompts").json(),
    }


def upload_rejected(served, data: bytes, expected_code: str, multipart: bool = False) -> None:
    """Upload over an existing task and as a new task: 422 with ``expected_code``, store unchanged."""
    before = store_view(served)
    for task in (KEEP, FRESH):
        if multipart:
            r = served.post(f"/v1/prompts?task={task}", files={"file": ("set.safetensors", data)})
        else:
            r = served.post(
                f"/v1/prompts?task={task}", content=data, headers={"content-type": "application/octet-stream"}
            )
        assert r.status_code == 422, (task, r.status_code, r.text)
        assert error_code(r) == expected_code, r.text
    assert store_view(served) == before
    assert served.state.prompt_sets.states.get("default", FRESH) is None and not len(
        served.state.prompt_sets.cache.resident_keys("default", FRESH)
    )


def raw_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def with_header(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


@pytest.fixture
def good(backbone):
    return make_set(backbone.info, seed=7)


# -- not safetensors at all ---------------------------------------------------------------------------------
class CreatesFile:
    """Unpickling this object creates ``path`` (an empty file): the proof that the payload ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_payload_never_runs(served, tmp_path):
    canary = tmp_path / "pwned"
    data = pickle.dumps(CreatesFile(canary))
    pickle.loads(pickle.dumps(CreatesFile(tmp_path / "proof"))).close()
    assert (tmp_path / "proof").exists()  # the payload is live: unpickling it does create its file
    upload_rejected(served, data, "not_safetensors")
    upload_rejected(served, data, "not_safetensors", multipart=True)
    torch_pt = io.BytesIO()
    torch.save({"shared_prompt": CreatesFile(canary)}, torch_pt)  # the same payload inside a torch checkpoint
    upload_rejected(served, torch_pt.getvalue(), "not_safetensors")
    assert not canary.exists()


def test_plain_pickle(served, good):
    upload_rejected(served, pickle.dumps(good.tensors()), "not_safetensors")


def test_torch_pt(served, good):
    buf = io.BytesIO()
    torch.save(good.tensors(), buf)
    upload_rejected(served, buf.getvalue(), "not_safetensors")


def test_renamed_npz(served, good):
    buf = io.BytesIO()
    np.savez(buf, **{k.replace(".", "_"): v.numpy() for k, v in good.tensors().items()})
    assert zipfile.is_zipfile(io.BytesIO(buf.getvalue()))
    upload_rejected(served, buf.getvalue(), "not_safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02, 4 / 1e9])
def test_truncated_safetensors(served, good, keep):
    data = encode(good)
    upload_rejected(served, data[: max(1, int(len(data) * keep))], "not_safetensors")


def test_header_length_two_to_the_40(served):
    upload_rejected(served, struct.pack("<Q", 2**40) + b'{"__metadata__": {}}', "not_safetensors")


def test_header_not_json(served):
    upload_rejected(served, struct.pack("<Q", 12) + b"{not json at", "not_safetensors")


def test_deeply_nested_json_in_the_header(served):
    header = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    upload_rejected(served, struct.pack("<Q", len(header)) + header, "nested_json")


def test_deeply_nested_json_in_the_class_names(served, good):
    meta = {**good.metadata(), "class_names": "[" * 50_000 + "]" * 50_000}
    upload_rejected(served, raw_safetensors(good.tensors(), meta), "nested_json")


def test_empty_body(served):
    upload_rejected(served, b"", "not_safetensors")


# -- safetensors, but not a valid prompt set ----------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["shared_prompt", "head.weight", "group_prompts", "group_keys"])
def test_non_finite_values(served, good, name, value):
    tensors = good.tensors()
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value
    upload_rejected(served, raw_safetensors(tensors, good.metadata()), "non_finite")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.int64, torch.uint8, torch.bool])
def test_disallowed_dtypes(served, good, dtype):
    tensors = good.tensors()
    tensors["head.weight"] = tensors["head.weight"].to(dtype)
    upload_rejected(served, raw_safetensors(tensors, good.metadata()), "bad_dtype")


@pytest.mark.parametrize(
    ("name", "reshape", "code"),
    [
        ("shared_prompt", lambda t: t.reshape(t.shape[0], -1), "bad_shape"),  # wrong rank
        ("shared_prompt", lambda t: t[..., :-1], "embed_dim_mismatch"),  # wrong width
        ("shared_prompt", lambda t: t[:-1], "depth_mismatch"),  # wrong depth
        ("head.weight", lambda t: t.unsqueeze(0), "bad_shape"),
        ("head.weight", lambda t: t[:, :-1], "bad_shape"),
        ("group_prompts", lambda t: t[:, :-1], "bad_shape"),
        ("group_keys", lambda t: t[:-1], "bad_shape"),
        ("group_keys", lambda t: t.flatten(), "bad_shape"),
    ],
)
def test_wrong_rank_or_dimension(served, good, name, reshape, code):
    tensors = good.tensors()
    tensors[name] = reshape(tensors[name]).clone()
    upload_rejected(served, raw_safetensors(tensors, good.metadata()), code)


@pytest.mark.parametrize("missing", ["shared_prompt", "head.weight", "group_keys", "group_prompts"])
def test_missing_tensor(served, good, missing):
    tensors = good.tensors()
    del tensors[missing]
    upload_rejected(served, raw_safetensors(tensors, good.metadata()), "missing_tensor")


@pytest.mark.parametrize("extra", ["evil", "head.bias", "__metadata__x"])
def test_extra_tensor(served, good, extra):
    tensors = {**good.tensors(), extra: torch.zeros(4)}
    upload_rejected(served, raw_safetensors(tensors, good.metadata()), "unknown_tensor")


def test_wrong_backbone_fingerprint(served, good):
    meta = {**good.metadata(), "backbone_fingerprint": "0" * 64}
    upload_rejected(served, raw_safetensors(good.tensors(), meta), "fingerprint_mismatch")


@pytest.mark.parametrize(
    "change",
    [
        {"class_names": '["a", "b", '},  # not JSON
        {"class_names": '{"a": 1}'},  # not a list
        {"class_names": "[1, 2, 3]"},  # not strings
        {"share_blocks": "three"},
        {"top_k": "1.5"},
        {"head_scale": "nan"},
        {"head_scale": "fast"},
    ],
)
def test_malformed_metadata(served, good, change):
    meta = {**good.metadata(), **change}
    upload_rejected(served, raw_safetensors(good.tensors(), meta), "bad_metadata")


def test_metadata_not_string_to_string(served, good):
    # safetensors' own writer only emits str -> str metadata; craft the header by hand.
    header = {"__metadata__": {"format": 1, "class_names": ["a"]}}
    upload_rejected(served, with_header(header), "bad_metadata")


@pytest.mark.parametrize("drop", ["format", "class_names", "backbone_fingerprint", "share_blocks"])
def test_missing_metadata(served, good, drop):
    meta = {k: v for k, v in good.metadata().items() if k != drop}
    upload_rejected(
        served, raw_safetensors(good.tensors(), meta), "bad_format" if drop == "format" else "missing_metadata"
    )


def test_ten_thousand_class_names(served, backbone):
    ps = make_set(backbone.info, classes=10_000)
    upload_rejected(served, encode(ps), "too_many_classes")


def test_class_names_count_mismatch(served, good):
    meta = {**good.metadata(), "class_names": json.dumps(["only-one"])}
    upload_rejected(served, raw_safetensors(good.tensors(), meta), "class_count_mismatch")


def test_a_valid_upload_still_works_afterwards(served, backbone):
    before = store_view(served)
    r = served.post(f"/v1/prompts?task={KEEP}", content=prompt_bytes(backbone.info, seed=99))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == before["active"][KEEP] + 1


# -- what was received, what differs ------------------------------------------------------------------------
def rejection(served, data: bytes) -> dict:
    r = served.post(f"/v1/prompts?task={FRESH}", content=data, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 422, r.text
    return r.json()["error"]


def test_a_jpeg_upload_is_named_as_a_jpeg(served):
    data = jpeg_bytes()
    upload_rejected(served, data, "not_safetensors")
    error = rejection(served, data)
    assert error["message"] == "this looks like a JPEG image, not a safetensors prompt set (lpt-prompt-set/1)"


@pytest.mark.parametrize(
    ("weights", "img_size", "field", "says"),
    [
        ("random:0", 48, "backbone_input_size", "input size differs: this backbone is 3x32x32, the prompt set was "
         "trained on 3x48x48"),
        ("random:1", 32, "backbone_fingerprint", "weights differ (same name and input size, test_vit)"),
    ],
)  # fmt: skip
def test_a_backbone_mismatch_names_the_field_that_differs(served, weights, img_size, field, says):
    data = prompt_bytes(load_backbone("test_vit", weights, img_size=img_size).info, seed=3)
    upload_rejected(served, data, "fingerprint_mismatch")
    error = rejection(served, data)
    assert error["field"] == field and says in error["message"], error


def test_the_backbone_endpoint_gives_what_a_trainer_compares(served, backbone):
    """name, fingerprint and input size from GET /v1/backbone: enough to check a backbone before training."""
    served_info = served.get("/v1/backbone").json()
    assert {k: served_info[k] for k in ("name", "fingerprint", "input_size")} == {
        "name": "test_vit",
        "fingerprint": backbone.info.fingerprint,
        "input_size": [3, 32, 32],
    }
    assert describe_mismatch(served_info, backbone.info.to_dict()) == ""
    other = load_backbone("test_vit", "random:0", img_size=48).info.to_dict()
    assert mismatched_field(served_info, other) == "input_size"
