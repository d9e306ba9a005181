"""The Open Inference Protocol's REST front end in-process: malformed requests answer 4xx in the protocol's error
format and change nothing (no lease left open, nothing queued, no forward, the store as it was); the repository's
load pins a set only with ``pin_loaded_models``, and unload releases it."""

from __future__ import annotations

import json

import pytest

from lpt.prompt_set import encode
from service.oip.codec import join_bytes_elements
from service.resident import SetKey
from tests.support.images import image_bytes
from tests.support.prompt_sets import make_set
from tests.support.service_app import auth, make_config, open_leases, serve_in_thread


def binary_request(images: list[bytes], size_delta: int = 0, **tensor: object) -> tuple[bytes, dict[str, str]]:
    raw = join_bytes_elements(images)
    fields = {"name": "IMAGE", "datatype": "BYTES", "shape": [len(images)], **tensor}
    fields["parameters"] = {"binary_data_size": len(raw) + size_delta}
    header = json.dumps({"inputs": [fields]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)), **auth("acme")}


@pytest.fixture(scope="module")
def served(backbone, tmp_path_factory):
    config = make_config(
        tmp_path_factory.mktemp("oip-rest"), api_keys={"acme": "acme-secret-0123456789"}, max_image_bytes=4096
    )
    with serve_in_thread(config, backbone) as s:
        data = encode(make_set(backbone.info, 3, seed=5))
        assert s.post("/v1/prompts", params={"task": "pets"}, content=data, headers=auth("acme")).status_code == 201
        yield s


def good() -> tuple[bytes, dict[str, str]]:
    return binary_request([image_bytes(1, (16, 16))])


def bad_requests() -> dict[str, tuple[str, bytes, dict[str, str], int]]:
    body, headers = good()
    return {
        "header length past the body": ("pets", body, {**headers, "Inference-Header-Content-Length": "99999"}, 400),
        "header length not a number": ("pets", body, {**headers, "Inference-Header-Content-Length": "x"}, 400),
        "binary size too small": ("pets", *binary_request([image_bytes(1)], size_delta=-1), 400),
        "bytes after the tensors": ("pets", body + b"tail", headers, 400),
        "wrong datatype": ("pets", *binary_request([image_bytes(1)], datatype="UINT8"), 400),
        "wrong shape": ("pets", *binary_request([image_bytes(1)], shape=[1, 1]), 400),
        "not an image": ("pets", *binary_request([b"plain text, no image"]), 415),
        "image over the byte limit": ("pets", *binary_request([b"\x89PNG" + b"0" * 5000]), 413),
        "body over the limit": ("pets", *binary_request([b"0" * 4000] * 30), 413),
        "not json": ("pets", b"{nope", auth("acme"), 400),
        "unknown task": ("cats", body, headers, 404),
        "malformed task id": ("Pets!", body, headers, 422),
        "no key": ("pets", body, {"Inference-Header-Content-Length": headers["Inference-Header-Content-Length"]}, 401),
    }


@pytest.mark.parametrize("case", sorted(bad_requests()))
def test_a_bad_request_answers_4xx_in_the_protocols_format_and_changes_nothing(served, case):
    task, body, headers, status = bad_requests()[case]
    state = served.state
    forwards = state.worker.batches
    versions = state.store.list_versions("acme", "pets")
    r = served.post(f"/v2/models/{task}/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    assert r.json()["error"].split(":")[0].replace("_", "").isalpha()  # the typed code leads the message
    assert state.worker.batches == forwards
    assert len(state.classifier.queue) == 0
    assert all(n == 0 for n in open_leases(state).values())
    assert state.store.list_versions("acme", "pets") == versions


def test_a_bad_model_version_is_refused(served):
    body, headers = good()
    for version in ("abc", "0", "-1", "99999999999"):
        r = served.post(f"/v2/models/pets/versions/{version}/infer", content=body, headers=headers)
        assert r.status_code == 422 and r.json()["error"].startswith("invalid_version"), r.text
    assert served.post("/v2/models/pets/versions/7/infer", content=body, headers=headers).status_code == 404
    assert served.post("/v2/models/pets/versions/1/infer", content=body, headers=headers).status_code == 200


def test_server_endpoints_need_no_key_and_model_endpoints_do(served):
    assert served.get("/v2").json()["name"] == "lpt-serve"
    assert served.get("/v2/health/live").status_code == 200
    assert served.get("/v2/health/ready").status_code == 200
    assert served.get("/v2/models/pets").status_code == 401
    assert served.get("/v2/models/pets", headers=auth("acme")).json()["outputs"][0]["shape"] == [-1, 3]
    assert served.get("/v2/models/pets/ready", headers=auth("acme")).status_code == 200
    assert served.post("/v2/repository/index", content=b"[]", headers=auth("acme")).status_code == 400
    assert served.post("/v2/repository/index", content=b"[" * 60_000, headers=auth("acme")).status_code == 400
    load = "/v2/repository/models/pets/load"
    r = served.post(load, content=b'{"parameters": {"config": "{}"}}', headers=auth("acme"))
    assert r.status_code == 400 and r.json()["error"].startswith("unsupported_parameter")


@pytest.mark.parametrize("pin", [True, False])
def test_load_pins_only_with_the_setting_and_unload_drops_the_set(backbone, tmp_path, pin):
    config = make_config(tmp_path, api_keys={"acme": "acme-secret-0123456789"}, pin_loaded_models=pin)
    with serve_in_thread(config, backbone) as s:
        data = encode(make_set(backbone.info, 3, seed=6))
        version = s.post("/v1/prompts", params={"task": "pets"}, content=data, headers=auth("acme")).json()
        key = SetKey("acme", "pets", version["version"], version["sha256"])
        table = s.state.prompt_sets.cache.table
        s.post("/v2/repository/models/pets/unload", headers=auth("acme"))
        assert key not in table
        assert s.post("/v2/repository/models/pets/load", headers=auth("acme")).status_code == 200
        assert key in table and table.leases_of(key) == (1 if pin else 0)
        index = s.post("/v2/repository/index", headers=auth("acme")).json()
        assert index == [
            {"name": "pets", "version": "1", "state": "READY", "reason": "active, resident" + (", pinned" * pin)}
        ]
        assert s.post("/v2/repository/models/pets/unload", headers=auth("acme")).status_code == 200
        assert key not in table
        assert s.post("/v2/repository/models/nope/unload", headers=auth("acme")).status_code == 404
