"""tritonclient (HTTP and gRPC), the Open Inference Protocol's own clients, against a real ``lpt-serve`` process.

One server for the module (two tenants' keys, gRPC on a free port, a 50 ms batching window so concurrent requests
share batches, ``--pin-loaded-models``): health, metadata, inference with binary and JSON tensors and with
``class_count``, versions, the repository index, load and unload, wrong keys, other tenants' tasks, bad tensors.
Every probability equals ``/v1/classify``'s for the same image, task and version; OIP and ``/v1`` requests of
different tenants' tasks share forward passes under load.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from lpt.prompt_set import encode
from tests.support.images import image_bytes
from tests.support.lpt_serve import TEST_BACKBONE_ARGS, LptServe
from tests.support.metrics import metric_value
from tests.support.ports import free_port
from tests.support.prompt_sets import make_set
from tests.support.service_app import KEYS

pytestmark = pytest.mark.slow

CATS_V1 = ["c0", "c1", "c2", "c3"]
CATS_V2 = ["tabby", "siamese", "persian", "sphynx", "bengal", "maine-coon"]
DOGS = ["collie", "pug", "husky"]
IMAGES = [image_bytes(seed) for seed in (11, 12, 13)]
MAX_DIFF = 1e-5


@dataclass
class Served:
    server: LptServe
    grpc_url: str
    http: triton_http.InferenceServerClient
    grpc: triton_grpc.InferenceServerClient


def http_auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def grpc_auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def served(backbone, tmp_path_factory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("oip")
    keys = ",".join(f"{tenant}:{secret}" for tenant, secret in KEYS.items())
    args = [*TEST_BACKBONE_ARGS, "--max-wait-ms", "50", "--pin-loaded-models"]
    server = LptServe(tmp / "serve.log", args, {"LPT_API_KEYS": keys}, data_dir=tmp, grpc_port=free_port())
    with server:
        uploads = [("acme", "cats", CATS_V1, 1), ("acme", "cats", CATS_V2, 2), ("globex", "dogs", DOGS, 3)]
        for tenant, task, classes, seed in uploads:
            data = encode(make_set(backbone.info, classes, seed=seed))
            r = httpx.post(f"{server.url}/v1/prompts", params={"task": task}, content=data, headers=http_auth(tenant))
            assert r.status_code == 201, r.text
        grpc_url = f"127.0.0.1:{server.grpc_port}"
        http = triton_http.InferenceServerClient(f"127.0.0.1:{server.port}", concurrency=4)
        grpc = triton_grpc.InferenceServerClient(grpc_url)
        try:
            yield Served(server, grpc_url, http, grpc)
        finally:
            http.close()
            grpc.close()


def v1_probabilities(served: Served, tenant: str, task: str, image: bytes, version: int | None = None) -> np.ndarray:
    """Every class's score from /v1/classify, by class index."""
    params = {"task": task, "top_k": 100} | ({"version": version} if version else {})
    headers = {**http_auth(tenant), "Content-Type": "image/png"}
    r = httpx.post(f"{served.server.url}/v1/classify", params=params, content=image, headers=headers)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    probs = np.zeros(len(predictions), dtype=np.float64)
    for p in predictions:
        probs[p["index"]] = p["score"]
    return probs


def expected(served: Served, tenant: str, task: str, version: int | None = None) -> np.ndarray:
    return np.stack([v1_probabilities(served, tenant, task, image, version) for image in IMAGES])


def http_input(binary: bool = True, images: list[bytes] = IMAGES) -> triton_http.InferInput:
    tensor = triton_http.InferInput("IMAGE", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=object))
    else:  # JSON: each image as its base64 text
        tensor.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=object), binary_data=False)
    return tensor


def grpc_input(images: list[bytes] = IMAGES) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("IMAGE", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status())


# -- server ---------------------------------------------------------------------------------------------------------
def test_health_and_server_metadata_over_both_protocols(served):
    assert served.http.is_server_live() and served.http.is_server_ready()
    assert served.grpc.is_server_live() and served.grpc.is_server_ready()
    for metadata in (served.http.get_server_metadata(), served.grpc.get_server_metadata(as_json=True)):
        assert metadata["name"] == "lpt-serve"
        assert {"binary_tensor_data", "classification", "model_repository"} <= set(metadata["extensions"])


def test_calls_the_proto_does_not_declare_answer_unimplemented(served):
    unimplemented = "StatusCode.UNIMPLEMENTED"
    assert status_of(lambda: served.grpc.get_model_config("cats", headers=grpc_auth("acme"))) == unimplemented
    assert status_of(lambda: served.grpc.get_inference_statistics(headers=grpc_auth("acme"))) == unimplemented


# -- models ---------------------------------------------------------------------------------------------------------
def test_model_metadata_names_the_tensors_and_the_versions(served):
    for version, classes in (("", CATS_V2), ("1", CATS_V1), ("2", CATS_V2)):
        http = served.http.get_model_metadata("cats", version, headers=http_auth("acme"))
        grpc = served.grpc.get_model_metadata("cats", version, headers=grpc_auth("acme"), as_json=True)
        for metadata in (http, grpc):
            assert metadata["name"] == "cats" and metadata["versions"] == ["1", "2"]
            assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [("IMAGE", "BYTES")]
            assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [("PROBABILITIES", "FP32")]
            assert [int(d) for d in metadata["outputs"][0]["shape"]] == [-1, len(classes)]
            assert [int(d) for d in metadata["inputs"][0]["shape"]] == [-1]
    assert served.http.is_model_ready("cats", headers=http_auth("acme"))
    assert served.grpc.is_model_ready("cats", "1", headers=grpc_auth("acme"))


def test_binary_and_json_tensors_over_http_and_grpc_equal_v1_classify(served):
    want = expected(served, "acme", "cats")
    results = {
        "http binary": served.http.infer("cats", [http_input()], headers=http_auth("acme")),
        "http json out": served.http.infer(
            "cats",
            [http_input()],
            outputs=[triton_http.InferRequestedOutput("PROBABILITIES", binary_data=False)],
            headers=http_auth("acme"),
        ),
        "http json in": served.http.infer("cats", [http_input(binary=False)], headers=http_auth("acme")),
        "grpc": served.grpc.infer("cats", [grpc_input()], headers=grpc_auth("acme")),
    }
    for how, result in results.items():
        got = result.as_numpy("PROBABILITIES")
        assert got.dtype == np.float32 and got.shape == want.shape, how
        assert np.abs(got - want).max() <= MAX_DIFF, how
    http_response = results["http binary"].get_response()
    assert (http_response["model_name"], http_response["model_version"]) == ("cats", "2")
    assert results["grpc"].get_response(as_json=True)["model_version"] == "2"


def test_a_named_version_answers_with_that_version(served):
    want = expected(served, "acme", "cats", version=1)
    http = served.http.infer("cats", [http_input()], model_version="1", headers=http_auth("acme"))
    grpc = served.grpc.infer("cats", [grpc_input()], model_version="1", headers=grpc_auth("acme"))
    for result in (http, grpc):
        assert np.abs(result.as_numpy("PROBABILITIES") - want).max() <= MAX_DIFF
    assert http.get_response()["model_version"] == "1"
    assert status_of(lambda: served.http.infer("cats", [http_input()], model_version="9", headers=http_auth("acme")))
    assert (
        status_of(lambda: served.grpc.infer("cats", [grpc_input()], model_version="9", headers=grpc_auth("acme")))
        == "StatusCode.NOT_FOUND"
    )


def test_class_count_answers_the_top_classes_as_score_index_label(served):
    want = expected(served, "globex", "dogs")
    http = served.http.infer(
        "dogs",
        [http_input()],
        outputs=[triton_http.InferRequestedOutput("PROBABILITIES", class_count=2)],
        headers=http_auth("globex"),
    )
    grpc = served.grpc.infer(
        "dogs",
        [grpc_input()],
        outputs=[triton_grpc.InferRequestedOutput("PROBABILITIES", class_count=2)],
        headers=grpc_auth("globex"),
    )
    for result in (http, grpc):
        rows = result.as_numpy("PROBABILITIES")
        assert rows.shape == (len(IMAGES), 2)
        for row, probs in zip(rows, want, strict=True):
            entries = [(v if isinstance(v, bytes) else v.encode()).decode().split(":") for v in row]
            assert [int(i) for _, i, _ in entries] == list(np.argsort(-probs)[:2])
            assert [label for _, i, label in entries] == [DOGS[int(i)] for _, i, _ in entries]
            assert all(abs(float(score) - probs[int(i)]) <= 1e-5 for score, i, _ in entries)


# -- tenancy and keys -----------------------------------------------------------------------------------------------
def test_a_wrong_key_is_refused(served):
    wrong_http = {"Authorization": "Bearer not-a-key-of-anyone-0123"}
    wrong_grpc = {"authorization": "Bearer not-a-key-of-anyone-0123"}
    assert status_of(lambda: served.http.infer("cats", [http_input()], headers=wrong_http)) == "401"
    assert status_of(lambda: served.http.get_model_metadata("cats")) == "401"
    assert status_of(lambda: served.grpc.infer("cats", [grpc_input()], headers=wrong_grpc)) == (
        "StatusCode.UNAUTHENTICATED"
    )
    assert status_of(lambda: served.grpc.get_model_repository_index()) == "StatusCode.UNAUTHENTICATED"


def test_another_tenants_task_is_a_missing_model(served):
    assert status_of(lambda: served.http.infer("cats", [http_input()], headers=http_auth("globex"))) == "404"
    assert status_of(lambda: served.http.get_model_metadata("cats", headers=http_auth("globex"))) == "404"
    assert not served.http.is_model_ready("cats", headers=http_auth("globex"))
    for call in (
        lambda: served.grpc.infer("cats", [grpc_input()], headers=grpc_auth("globex")),
        lambda: served.grpc.get_model_metadata("cats", headers=grpc_auth("globex")),
        lambda: served.grpc.is_model_ready("cats", headers=grpc_auth("globex")),
        lambda: served.grpc.load_model("cats", headers=grpc_auth("globex")),
    ):
        assert status_of(call) == "StatusCode.NOT_FOUND"


# -- bad tensors ----------------------------------------------------------------------------------------------------
def forwards(served: Served) -> float:
    return metric_value(httpx.get(f"{served.server.url}/metrics").text, "lpt_batch_size_count")


def test_bad_tensors_answer_4xx_and_run_nothing(served):
    before = forwards(served)
    not_an_image = [b"these bytes are no image at all"]
    assert status_of(lambda: served.http.infer("cats", [http_input(images=not_an_image)], headers=http_auth("acme")))
    assert status_of(lambda: served.grpc.infer("cats", [grpc_input(not_an_image)], headers=grpc_auth("acme"))) == (
        "StatusCode.INVALID_ARGUMENT"
    )
    wrong_type = triton_grpc.InferInput("IMAGE", [1, 3], "FP32")
    wrong_type.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    assert status_of(lambda: served.grpc.infer("cats", [wrong_type], headers=grpc_auth("acme"))) == (
        "StatusCode.INVALID_ARGUMENT"
    )
    url = f"{served.server.url}/v2/models/cats/infer"
    header = b'{"inputs":[{"name":"IMAGE","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":9}}]}'
    raw = b"\x05\x00\x00\x00abcde"
    for body, length in ((header + raw, str(len(header) + 50)), (header + raw + b"x", str(len(header)))):
        r = httpx.post(url, content=body, headers={**http_auth("acme"), "Inference-Header-Content-Length": length})
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"error"} and r.json()["error"].startswith("bad_")
    assert forwards(served) == before  # nothing was admitted to a batch
    result = served.http.infer("cats", [http_input(images=IMAGES[:1])], headers=http_auth("acme"))
    assert result.as_numpy("PROBABILITIES").shape == (1, len(CATS_V2))


# -- model repository -----------------------------------------------------------------------------------------------
def test_the_repository_index_lists_the_tenants_tasks_and_versions(served):
    http = served.http.get_model_repository_index(headers=http_auth("acme"))
    grpc = served.grpc.get_model_repository_index(headers=grpc_auth("acme"), as_json=True)["models"]
    for index in (http, grpc):
        assert sorted((m["name"], m["version"]) for m in index) == [("cats", "1"), ("cats", "2")]
        assert all(m["state"] == "READY" for m in index)
        active = next(m for m in index if m["version"] == "2")
        assert "active" in active["reason"]
    dogs = served.http.get_model_repository_index(headers=http_auth("globex"))
    assert [(m["name"], m["version"]) for m in dogs] == [("dogs", "1")]


def test_load_pins_and_unload_releases_a_task(served):
    def reason() -> str:
        index = served.grpc.get_model_repository_index(headers=grpc_auth("globex"), as_json=True)["models"]
        return index[0]["reason"]

    served.grpc.load_model("dogs", headers=grpc_auth("globex"))
    assert reason() == "active, resident, pinned"
    served.http.unload_model("dogs", headers=http_auth("globex"))
    assert reason() == "active"
    served.http.load_model("dogs", headers=http_auth("globex"))
    assert reason() == "active, resident, pinned"
    served.grpc.unload_model("dogs", headers=grpc_auth("globex"))
    assert reason() == "active"
    assert served.grpc.infer("dogs", [grpc_input()], headers=grpc_auth("globex")).as_numpy("PROBABILITIES").shape == (
        len(IMAGES),
        len(DOGS),
    )
    assert "resident" in reason()  # the request loaded it again


# -- one path for both front ends -----------------------------------------------------------------------------------
def test_oip_and_v1_requests_of_different_tenants_share_batches(served):
    """/v1 asks only for acme's cats, gRPC and REST OIP only for globex's dogs: a batch of two tasks mixes them."""
    text = httpx.get(f"{served.server.url}/metrics").text
    single_before = metric_value(text, "lpt_batch_tasks_bucket", le="1.0")
    batches_before = metric_value(text, "lpt_batch_tasks_count")
    stop = time.monotonic() + 3.0
    failures: list[BaseException] = []

    def v1() -> None:
        while time.monotonic() < stop:
            v1_probabilities(served, "acme", "cats", IMAGES[0])

    def oip_grpc() -> None:
        client = triton_grpc.InferenceServerClient(served.grpc_url)
        while time.monotonic() < stop:
            client.infer("dogs", [grpc_input(IMAGES[:1])], headers=grpc_auth("globex"))
        client.close()

    def oip_rest() -> None:
        client = triton_http.InferenceServerClient(f"127.0.0.1:{served.server.port}")
        while time.monotonic() < stop:
            client.infer("dogs", [http_input(images=IMAGES[1:2])], headers=http_auth("globex"))
        client.close()

    def guarded(fn) -> None:
        try:
            fn()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in (v1, v1, oip_grpc, oip_grpc, oip_rest)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures
    text = httpx.get(f"{served.server.url}/metrics").text
    batches = metric_value(text, "lpt_batch_tasks_count") - batches_before
    mixed = batches - (metric_value(text, "lpt_batch_tasks_bucket", le="1.0") - single_before)
    assert batches > 0 and mixed > 0, f"{mixed} of {batches} batches held both tasks"
