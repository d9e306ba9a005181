"""The Open Inference Protocol's tensors, plain code: REST bodies (JSON and binary), gRPC messages, outputs.

Every malformed request raises BadRequest (400) naming what is wrong; the encoded responses are read back with
tritonclient's own parser, so the bytes are what the protocol's clients expect.
"""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton_http

from service.errors import BadRequest
from service.oip import proto as pb
from service.oip.codec import (
    MAX_IMAGES,
    OutputTensor,
    RequestedOutput,
    classification_strings,
    encode_rest_response,
    join_bytes_elements,
    output_tensors,
    parse_rest_request,
    split_bytes_elements,
)
from service.oip.frontend import InferAnswer
from service.oip.grpc_server import decode_infer_request, encode_infer_response

IMAGES = [b"\x89PNG first", b"", b"\xff\xd8 third image bytes"]


def binary_body(images: list[bytes], header: dict | None = None, size: int | None = None) -> tuple[bytes, str]:
    """A request as tritonclient sends it by default: JSON header, then the length-prefixed elements."""
    raw = join_bytes_elements(images)
    tensor = {"name": "IMAGE", "datatype": "BYTES", "shape": [len(images)]}
    tensor["parameters"] = {"binary_data_size": len(raw) if size is None else size}
    head = json.dumps({"inputs": [tensor], **(header or {})}).encode()
    return head + raw, str(len(head))


def json_body(images: list[bytes], **fields: object) -> bytes:
    tensor = {"name": "IMAGE", "datatype": "BYTES", "shape": [len(images)]}
    tensor["data"] = [base64.b64encode(i).decode() for i in images]
    return json.dumps({"inputs": [tensor], **fields}).encode()


def rejected(body: bytes, header_length: str | None = None) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_rest_request(body, header_length)
    assert info.value.status == 400
    return info.value


# -- REST requests --------------------------------------------------------------------------------------------------
def test_a_binary_request_yields_its_images_and_the_default_output():
    body, length = binary_body(IMAGES, {"id": "r1", "parameters": {"binary_data_output": True}})
    request = parse_rest_request(body, length)
    assert request.images == IMAGES
    assert request.id == "r1"
    assert request.outputs == [RequestedOutput(binary=True, classification=0)]


def test_a_json_request_carries_base64_images_and_its_output():
    outputs = [{"name": "PROBABILITIES", "parameters": {"classification": 3}}]
    request = parse_rest_request(json_body(IMAGES, outputs=outputs), None)
    assert request.images == IMAGES
    assert request.outputs == [RequestedOutput(False, 3)]


def test_nested_json_data_is_flattened_in_row_major_order():
    body = json.loads(json_body(IMAGES[:2]))
    body["inputs"][0]["data"] = [[body["inputs"][0]["data"][0]], [body["inputs"][0]["data"][1]]]
    assert parse_rest_request(json.dumps(body).encode(), None).images == IMAGES[:2]


@pytest.mark.parametrize("length", ["abc", "0", "-5", "100000", "1.5"])
def test_a_header_length_that_lies_is_refused(length):
    body, _ = binary_body(IMAGES)
    assert rejected(body, length).code == "bad_inference_request"


def test_a_header_length_that_cuts_the_json_is_refused():
    body, length = binary_body(IMAGES)
    assert "not JSON" in rejected(body, str(int(length) - 3)).message
    assert rejected(body, str(int(length) + 3)).code in ("bad_inference_request", "bad_tensor")


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_a_binary_size_that_does_not_add_up_is_refused(delta):
    raw = join_bytes_elements(IMAGES)
    body, length = binary_body(IMAGES, size=len(raw) + delta)
    assert "binary_data_size" in rejected(body, length).message


def test_element_lengths_that_do_not_add_up_are_refused():
    raw = struct.pack("<I", 50) + b"short"
    head = json.dumps(
        {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()
    assert "declares 50 bytes" in rejected(head + raw, str(len(head))).message
    with pytest.raises(BadRequest, match="4-byte length"):
        split_bytes_elements(b"\x01\x00", 1)


def test_an_element_count_other_than_the_shape_is_refused():
    with pytest.raises(BadRequest, match="shape 2"):
        split_bytes_elements(join_bytes_elements(IMAGES), 2)
    with pytest.raises(BadRequest, match="shape 4"):
        split_bytes_elements(join_bytes_elements(IMAGES), 4)
    body = json.loads(json_body(IMAGES))
    body["inputs"][0]["shape"] = [2]
    assert "shape 2" in rejected(json.dumps(body).encode()).message


def test_binary_bytes_nobody_declared_are_refused():
    body = json_body(IMAGES)
    assert "binary_data_size" in rejected(body + b"extra", str(len(body))).message


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"datatype": "FP32"}, "datatype"),
        ({"datatype": "UINT8"}, "datatype"),
        ({"name": "INPUT0"}, "unknown input"),
        ({"shape": [3, 1]}, "shape"),
        ({"shape": [0]}, "holds 0 images"),
        ({"shape": [MAX_IMAGES + 1]}, f"holds {MAX_IMAGES + 1} images"),
        ({"shape": "3"}, "shape"),
        ({"shape": [True]}, "shape"),
        ({"data": ["aGk=", "not base64!", "aGk="]}, "element 1 is not base64"),
        ({"data": [3, 4, 5]}, "not a base64 string"),
        ({"data": "abc"}, "must be a list"),
    ],
)
def test_a_wrong_input_tensor_is_refused(change, words):
    body = json.loads(json_body(IMAGES))
    body["inputs"][0].update(change)
    error = rejected(json.dumps(body).encode())
    assert error.code == "bad_tensor" and words in error.message


@pytest.mark.parametrize(
    "header",
    [
        {"inputs": []},
        {"inputs": "IMAGE"},
        {"outputs": [{"name": "LOGITS"}]},
        {"outputs": [{"name": "PROBABILITIES", "parameters": {"classification": 0}}]},
        {"outputs": [{"name": "PROBABILITIES", "parameters": {"classification": True}}]},
        {"outputs": [{"name": "PROBABILITIES", "parameters": {"classification": "3"}}]},
        {"outputs": [{"name": "PROBABILITIES", "parameters": {"binary_data": "yes"}}]},
        {"outputs": [{"name": "PROBABILITIES"}] * 2},
        {"parameters": {"binary_data_output": 1}},
        {"parameters": []},
        {"id": 7},
    ],
)
def test_wrong_request_fields_are_refused(header):
    body = json.loads(json_body(IMAGES))
    body.update(header)
    rejected(json.dumps(body).encode())


@pytest.mark.parametrize("text", [b"", b"[1, 2]", b"{", b"\xff\xfe", b"[" * 100_000])
def test_a_body_that_is_no_json_object_is_refused(text):
    assert rejected(text).code == "bad_inference_request"


def test_data_and_binary_together_are_refused():
    body = json.loads(json_body(IMAGES))
    body["inputs"][0]["parameters"] = {"binary_data_size": 0}
    assert "both" in rejected(json.dumps(body).encode()).message


# -- outputs --------------------------------------------------------------------------------------------------------
PROBS = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=np.float32)
NAMES = ["cat", "dog", "fox"]


def test_classification_strings_are_score_index_label_best_first():
    assert classification_strings(PROBS, NAMES, 2) == [
        b"0.600000:1:dog",
        b"0.300000:2:fox",
        b"0.500000:0:cat",
        b"0.300000:2:fox",
    ]


def test_a_classification_above_the_class_count_answers_every_class():
    (tensor,) = output_tensors(PROBS, NAMES, [RequestedOutput(True, 10)])
    assert tensor.shape == [2, 3] and tensor.datatype == "BYTES"


@pytest.mark.parametrize("binary", [True, False])
def test_outputs_read_back_with_tritonclient(binary):
    outputs = output_tensors(PROBS, NAMES, [RequestedOutput(binary, 0)])
    body, length = encode_rest_response("pets", 3, "r9", outputs, {"sha256": "ab"})
    assert (length is not None) == binary
    result = triton_http.InferResult.from_response_body(body, header_length=length)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("pets", "3", "r9")
    assert response["parameters"] == {"sha256": "ab"}
    np.testing.assert_array_equal(result.as_numpy("PROBABILITIES"), PROBS)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_outputs_read_back_with_tritonclient(binary):
    outputs = output_tensors(PROBS, NAMES, [RequestedOutput(binary, 2)])
    body, length = encode_rest_response("pets", 3, "", outputs, {})
    got = triton_http.InferResult.from_response_body(body, header_length=length).as_numpy("PROBABILITIES")
    assert got.shape == (2, 2)
    assert [v if isinstance(v, bytes) else v.encode() for v in got.ravel()] == classification_strings(PROBS, NAMES, 2)


def test_a_response_without_a_request_id_has_none():
    body, _ = encode_rest_response("pets", 1, "", output_tensors(PROBS, NAMES, [RequestedOutput()]), {})
    assert "id" not in json.loads(body)


def test_fp32_raw_output_is_little_endian_row_major():
    tensor = OutputTensor("PROBABILITIES", "FP32", [2, 3], PROBS, True)
    assert tensor.raw() == struct.pack("<6f", *PROBS.ravel().tolist())


# -- gRPC messages --------------------------------------------------------------------------------------------------
def grpc_request(images: list[bytes], raw: bool = True, **tensor: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="pets", id="g1")
    fields = {"name": "IMAGE", "datatype": "BYTES", "shape": [len(images)], **tensor}
    added = request.inputs.add(**fields)
    if raw:
        request.raw_input_contents.append(join_bytes_elements(images))
    else:
        added.contents.bytes_contents.extend(images)
    return request


def test_a_grpc_request_with_raw_or_typed_contents_yields_its_images():
    for raw in (True, False):
        decoded = decode_infer_request(grpc_request(IMAGES, raw))
        assert decoded.images == IMAGES and decoded.id == "g1"
        assert decoded.outputs == [RequestedOutput(True, 0)]


def test_a_grpc_classification_parameter_is_read():
    request = grpc_request(IMAGES)
    request.outputs.add(name="PROBABILITIES").parameters["classification"].int64_param = 2
    assert decode_infer_request(request).outputs == [RequestedOutput(True, 2)]
    request.outputs[0].parameters["classification"].string_param = "2"
    with pytest.raises(BadRequest, match="integer"):
        decode_infer_request(request)
    request.outputs.add(name="PROBABILITIES")
    with pytest.raises(BadRequest, match="at most once"):
        decode_infer_request(request)


@pytest.mark.parametrize(
    "make",
    [
        lambda: grpc_request(IMAGES, datatype="FP32"),
        lambda: grpc_request(IMAGES, shape=[2]),
        lambda: grpc_request(IMAGES, raw=False, shape=[4]),
        lambda: grpc_request(IMAGES, name="INPUT0"),
        lambda: pb.ModelInferRequest(model_name="pets"),
    ],
)
def test_a_wrong_grpc_tensor_is_refused(make):
    with pytest.raises(BadRequest):
        decode_infer_request(make())


def test_raw_contents_for_a_missing_input_or_beside_typed_contents_are_refused():
    request = grpc_request(IMAGES)
    request.raw_input_contents.append(b"")
    with pytest.raises(BadRequest, match="raw_input_contents"):
        decode_infer_request(request)
    request = grpc_request(IMAGES)
    request.inputs[0].contents.bytes_contents.append(b"x")
    with pytest.raises(BadRequest, match="both"):
        decode_infer_request(request)


def test_a_grpc_response_carries_raw_outputs():
    outputs = output_tensors(PROBS, NAMES, [RequestedOutput(True, 0)])
    response = encode_infer_response(InferAnswer("pets", 2, "ab", "g1", outputs))
    assert (response.model_name, response.model_version, response.id) == ("pets", "2", "g1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("PROBABILITIES", "FP32", [2, 3])]
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(got, PROBS)
    assert response.parameters["sha256"].string_param == "ab"
    (classes,) = encode_infer_response(
        InferAnswer("pets", 2, "ab", "", output_tensors(PROBS, NAMES, [RequestedOutput(True, 1)]))
    ).raw_output_contents
    assert split_bytes_elements(classes, 2) == [b"0.600000:1:dog", b"0.500000:0:cat"]


@pytest.mark.parametrize("depth", [900, 5000])
def test_deeply_nested_data_is_read_or_refused_never_a_server_error(depth):
    data = "[" * depth + '"aGk="' + "]" * depth
    body = ('{"inputs":[{"name":"IMAGE","datatype":"BYTES","shape":[1],"data":' + data + "}]}").encode()
    try:
        assert parse_rest_request(body, None).images == [b"hi"]
    except BadRequest as exc:
        assert exc.status == 400
