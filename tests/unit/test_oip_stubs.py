"""The committed gRPC stubs are what ``scripts/generate_oip_stubs.py`` generates from the committed ``.proto``, and
they live in a descriptor pool of their own: tritonclient's copy of the protocol loads beside them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_oip_stubs", ROOT / "scripts" / "generate_oip_stubs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_stubs_are_generated_from_the_proto(tmp_path):
    generator = load_generator()
    generated = generator.generated_sources(tmp_path)
    assert sorted(generated) == ["open_inference_pb2.py", "open_inference_pb2_grpc.py"]
    for name, text in generated.items():
        committed = (generator.PROTO_DIR / name).read_text()
        assert committed == text, f"{name} is stale: run python scripts/generate_oip_stubs.py"
    assert generator.OWN_POOL in generated["open_inference_pb2.py"]


def test_the_stubs_and_tritonclients_protocol_load_in_one_process():
    from tritonclient.grpc import service_pb2 as triton

    from service.oip.proto import POOL
    from service.oip.proto import open_inference_pb2 as ours

    request = ours.ModelInferRequest(model_name="pets", raw_input_contents=[b"\x00\x00\x00\x00"])
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    request.outputs.add(name="PROBABILITIES").parameters["classification"].int64_param = 3
    theirs = triton.ModelInferRequest.FromString(request.SerializeToString())
    assert theirs.outputs[0].parameters["classification"].int64_param == 3
    assert ours.ModelInferRequest.FromString(theirs.SerializeToString()) == request
    assert ours.DESCRIPTOR.pool is POOL
