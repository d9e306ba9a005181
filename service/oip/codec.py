"""Tensors of the Open Inference Protocol, in and out: plain code, no web framework, no torch.

What a model (a task) takes and gives:

- one input, ``IMAGE``: a ``BYTES`` tensor of shape ``[N]``, each element one encoded image (JPEG, PNG, ...);
- one output, ``PROBABILITIES``: ``FP32`` of shape ``[N, C]``, the class probabilities of each image; or, with the
  classification extension (``"classification": k`` on the output), ``BYTES`` of shape ``[N, k]`` holding
  ``"score:index:label"`` strings, best first.

REST bodies are JSON, optionally followed by binary tensor data (the binary tensor extension): the
``Inference-Header-Content-Length`` header says how many leading bytes are the JSON header, each tensor with
``"parameters": {"binary_data_size": n}`` takes the next ``n`` bytes, and the sizes add up to the rest of the body
exactly. Binary ``BYTES`` tensors are their elements, each prefixed by its length (4-byte little-endian unsigned
integer); ``FP32`` ones are the raw little-endian floats, row-major. In a JSON body a ``BYTES`` element of an
image is its base64 text (images are not UTF-8 strings).

Every malformed request raises ``BadRequest`` (400, code ``bad_tensor`` or ``bad_inference_request``) before
anything is admitted, leased or decoded.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.api.body import MAX_PARTS
from service.errors import BadRequest

INPUT_NAME = "IMAGE"
OUTPUT_NAME = "PROBABILITIES"
BYTES = "BYTES"
FP32 = "FP32"
# A request carries at most as many images as a /v1 multipart request.
MAX_IMAGES = MAX_PARTS
# The largest classification k a request may ask for (then cut to the class count), as /v1's top_k.
MAX_CLASSIFICATION = 100_000
HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")
# Clients find outputs by name, so the one output is asked for at most once (probabilities or classification).
ONE_OUTPUT = f"outputs must name the one output, {OUTPUT_NAME}, at most once"


@dataclass(frozen=True)
class RequestedOutput:
    """One output a request asks for.

    Attributes:
        binary: send it as binary data after the JSON header (REST; gRPC outputs are always raw).
        classification: 0 for the probabilities; k for the top k classes as ``"score:index:label"``.
    """

    binary: bool = False
    classification: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: its id, the encoded images, and the outputs asked for."""

    id: str
    images: list[bytes]
    outputs: list[RequestedOutput]


@dataclass(frozen=True)
class OutputTensor:
    """One output of a response: ``FP32`` probabilities (``values`` a float32 array) or ``BYTES`` strings."""

    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[bytes]
    binary: bool

    def raw(self) -> bytes:
        """The tensor's binary form: little-endian FP32, or length-prefixed BYTES elements."""
        if self.datatype == FP32:
            assert isinstance(self.values, np.ndarray)
            return self.values.astype("<f4", copy=False).tobytes()
        assert isinstance(self.values, list)
        return join_bytes_elements(self.values)

    def json_data(self) -> list:
        """The tensor's elements for a JSON body, flattened (FP32 as numbers, BYTES as UTF-8 strings)."""
        if self.datatype == FP32:
            assert isinstance(self.values, np.ndarray)
            return self.values.ravel().tolist()
        return [v.decode() for v in self.values]


def bad_tensor(message: str, field: str = INPUT_NAME) -> BadRequest:
    return BadRequest(message, field, code="bad_tensor")


def bad_request(message: str, field: str = "body") -> BadRequest:
    return BadRequest(message, field, code="bad_inference_request")


# -- the input ------------------------------------------------------------------------------------------------------
def image_count(name: str, datatype: str, shape: list[int]) -> int:
    """The number of images an input declares; raises unless it is ``IMAGE``, ``BYTES``, shape ``[N]``."""
    if name != INPUT_NAME:
        raise bad_tensor(f"unknown input {name!r}: the only input is {INPUT_NAME!r}", name or "inputs")
    if datatype != BYTES:
        raise bad_tensor(f"input {INPUT_NAME} has datatype {datatype!r}; it must be {BYTES}")
    if len(shape) != 1 or not isinstance(shape[0], int) or isinstance(shape[0], bool):
        raise bad_tensor(f"input {INPUT_NAME} has shape {shape}; it must be [N] (one encoded image per element)")
    count = shape[0]
    if not 1 <= count <= MAX_IMAGES:
        raise bad_tensor(f"input {INPUT_NAME} holds {count} images; 1 to {MAX_IMAGES} are accepted")
    return count


def split_bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """The ``count`` elements of a binary BYTES tensor (each prefixed by its 4-byte little-endian length).

    Raises:
        BadRequest: when the prefixes do not add up to exactly ``raw`` or the count differs.
    """
    out: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise bad_tensor(f"input {INPUT_NAME}: {len(raw) - offset} bytes left where a 4-byte length was due")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + size > len(raw):
            raise bad_tensor(
                f"input {INPUT_NAME}: element {len(out)} declares {size} bytes, {len(raw) - offset} are left"
            )
        out.append(bytes(view[offset : offset + size]))
        offset += size
        if len(out) > count:
            break
    if len(out) != count:
        raise bad_tensor(f"input {INPUT_NAME}: the binary data holds {len(out)} or more elements, the shape {count}")
    return out


def join_bytes_elements(elements: list[bytes]) -> bytes:
    """A binary BYTES tensor: each element prefixed by its 4-byte little-endian length."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def base64_elements(data: Any, count: int) -> list[bytes]:
    """The images of a JSON ``data`` field (base64 strings, possibly nested as the shape)."""
    flat = _flatten(data)
    if len(flat) != count:
        raise bad_tensor(f"input {INPUT_NAME}: data holds {len(flat)} elements, the shape {count}")
    out = []
    for i, item in enumerate(flat):
        if not isinstance(item, str):
            raise bad_tensor(f"input {INPUT_NAME}: element {i} is {type(item).__name__}, not a base64 string")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise bad_tensor(f"input {INPUT_NAME}: element {i} is not base64 ({exc})") from exc
    return out


def _flatten(data: Any) -> list:
    """Nested lists in row-major order, without recursion (the nesting is the client's to choose)."""
    if not isinstance(data, list):
        raise bad_tensor(f"input {INPUT_NAME}: data must be a list, not {type(data).__name__}")
    flat: list = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], stack)
        if item is stack:  # this list is done
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


# -- the outputs ----------------------------------------------------------------------------------------------------
def requested_output(name: str, binary: bool, classification: Any) -> RequestedOutput:
    """One requested output, checked: its name, and a classification count that is a positive integer."""
    if name != OUTPUT_NAME:
        raise bad_tensor(f"unknown output {name!r}: the only output is {OUTPUT_NAME!r}", name or "outputs")
    if classification is None:
        return RequestedOutput(binary, 0)
    if not isinstance(classification, int) or isinstance(classification, bool):
        raise bad_tensor(f"output {OUTPUT_NAME}: classification must be an integer", OUTPUT_NAME)
    if not 1 <= classification <= MAX_CLASSIFICATION:
        raise bad_tensor(f"output {OUTPUT_NAME}: classification must be 1 to {MAX_CLASSIFICATION}", OUTPUT_NAME)
    return RequestedOutput(binary, classification)


def output_tensors(probs: np.ndarray, class_names: list[str], requested: list[RequestedOutput]) -> list[OutputTensor]:
    """The response's outputs for ``probs`` (``[N, C]``), one per requested output, in order."""
    out = []
    for want in requested:
        if want.classification:
            k = min(want.classification, probs.shape[1])
            strings = classification_strings(probs, class_names, k)
            out.append(OutputTensor(OUTPUT_NAME, BYTES, [probs.shape[0], k], strings, want.binary))
        else:
            out.append(OutputTensor(OUTPUT_NAME, FP32, list(probs.shape), probs, want.binary))
    return out


def classification_strings(probs: np.ndarray, class_names: list[str], k: int) -> list[bytes]:
    """The top ``k`` classes of each row as ``"score:index:label"``, best first (ties: the lower index first)."""
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out += [f"{float(row[i]):.6f}:{int(i)}:{class_names[int(i)]}".encode() for i in order]
    return out


# -- REST bodies ----------------------------------------------------------------------------------------------------
def split_rest_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header (a dict) and the binary data after it.

    Args:
        body: the whole request body.
        header_length: the ``Inference-Header-Content-Length`` header; None when the body is all JSON.
    """
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError as exc:
            raise bad_request(f"{HEADER_LENGTH} {header_length[:40]!r} is not an integer", HEADER_LENGTH) from exc
        if not 0 < length <= len(body):
            raise bad_request(f"{HEADER_LENGTH} {length} is outside the body of {len(body)} bytes", HEADER_LENGTH)
        header, binary = body[:length], body[length:]
    try:
        parsed = json.loads(header)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the inference header is not JSON: {str(exc)[:200]}") from exc
    if not isinstance(parsed, dict):
        raise bad_request("the inference header must be a JSON object")
    return parsed, binary


def parse_rest_request(body: bytes, header_length: str | None) -> InferRequest:
    """A REST inference request (JSON, or JSON and binary tensor data), checked in full.

    Raises:
        BadRequest: a header length that lies, sizes that do not add up, an unknown input or output, a wrong
            datatype or shape, element counts that differ from the shape, malformed JSON.
    """
    header, binary = split_rest_body(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad_tensor(f"a request has exactly one input, {INPUT_NAME!r}", "inputs")
    tensor = inputs[0]
    count = image_count(str(tensor.get("name", "")), str(tensor.get("datatype", "")), _shape(tensor.get("shape")))
    size = _parameters(tensor).get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise bad_tensor(f"input {INPUT_NAME} has both data and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad_tensor(f"input {INPUT_NAME}: binary_data_size must be a non-negative integer")
        if size != len(binary):
            raise bad_tensor(
                f"input {INPUT_NAME}: binary_data_size {size} does not match the {len(binary)} bytes after the header"
            )
        images = split_bytes_elements(binary, count)
    else:
        if binary:
            raise bad_request(f"{len(binary)} bytes follow the header but no input declares binary_data_size")
        if "data" not in tensor:
            raise bad_tensor(f"input {INPUT_NAME} has neither data nor binary_data_size")
        images = base64_elements(tensor["data"], count)
    return InferRequest(_request_id(header), images, _rest_outputs(header))


def _rest_outputs(header: dict) -> list[RequestedOutput]:
    binary_default = _parameters(header).get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise bad_request("binary_data_output must be true or false", "parameters")
    outputs = header.get("outputs")
    if outputs is None or outputs == []:
        return [RequestedOutput(binary_default, 0)]
    if not isinstance(outputs, list) or len(outputs) > 1 or not all(isinstance(o, dict) for o in outputs):
        raise bad_tensor(ONE_OUTPUT, "outputs")
    out = []
    for o in outputs:
        params = _parameters(o)
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise bad_tensor(f"output {OUTPUT_NAME}: binary_data must be true or false", OUTPUT_NAME)
        out.append(requested_output(str(o.get("name", "")), binary, params.get("classification")))
    return out


def _parameters(obj: dict) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise bad_request("parameters must be a JSON object", "parameters")
    return params


def _shape(shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise bad_tensor(f"input {INPUT_NAME}: shape must be a list of integers")
    return shape


def _request_id(header: dict) -> str:
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise bad_request("id must be a string", "id")
    return request_id


def encode_rest_response(
    model: str, version: int, request_id: str, outputs: list[OutputTensor], parameters: dict[str, str]
) -> tuple[bytes, int | None]:
    """The response body and, when binary data follows the JSON header, the header's length."""
    tensors, blobs = [], []
    for t in outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.binary:
            raw = t.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = t.json_data()
        tensors.append(entry)
    header: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request_id:
        header["id"] = request_id
    header |= {"parameters": parameters, "outputs": tensors}
    encoded = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    if not blobs:
        return encoded, None
    return encoded + b"".join(blobs), len(encoded)


def tensor_metadata(class_count: int) -> tuple[dict, dict]:
    """The metadata of the input and the output of a task with ``class_count`` classes."""
    return (
        {"name": INPUT_NAME, "datatype": BYTES, "shape": [-1]},
        {"name": OUTPUT_NAME, "datatype": FP32, "shape": [-1, class_count]},
    )
