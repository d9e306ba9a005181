"""The committed descriptor set is what ``scripts/compile_oip_proto.py`` compiles from the committed ``.proto``; the
messages built from it live in a descriptor pool of their own (tritonclient's copy of the protocol loads beside
them) and are wire-compatible with tritonclient's; the gRPC servicer answers exactly the service's methods."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]


def load_compiler():
    spec = importlib.util.spec_from_file_location("compile_oip_proto", ROOT / "scripts" / "compile_oip_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_descriptor_set_is_compiled_from_the_proto():
    compiler = load_compiler()
    compiled = descriptor_pb2.FileDescriptorSet.FromString(compiler.compiled_descriptor_set())
    committed = descriptor_pb2.FileDescriptorSet.FromString(compiler.DESCRIPTOR_SET.read_bytes())
    # Parsed, not byte-for-byte: protoc's serialization order is not a promise across versions.
    assert committed == compiled, "open_inference.binpb is stale: run python scripts/compile_oip_proto.py"
    assert [f.name for f in committed.file] == ["open_inference.proto"]


def test_the_messages_and_tritonclients_protocol_load_in_one_process():
    from tritonclient.grpc import service_pb2 as triton

    from service.oip import proto as ours

    request = ours.ModelInferRequest(model_name="pets", raw_input_contents=[b"\x00\x00\x00\x00"])
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    request.outputs.add(name="PROBABILITIES").parameters["classification"].int64_param = 3
    theirs = triton.ModelInferRequest.FromString(request.SerializeToString())
    assert theirs.outputs[0].parameters["classification"].int64_param == 3
    assert ours.ModelInferRequest.FromString(theirs.SerializeToString()) == request
    assert ours.ModelInferRequest.DESCRIPTOR.file.pool is ours.POOL
    assert isinstance(request.inputs[0], ours.ModelInferRequest.InferInputTensor)


def test_the_servicer_has_a_method_for_each_rpc_and_no_other():
    from service.oip.grpc_server import InferenceServicer
    from service.oip.proto import SERVICE

    rpcs = {name for name in vars(InferenceServicer) if name[0].isupper() and name != "OPEN"}
    assert rpcs == {m.name for m in SERVICE.methods}
    assert rpcs > InferenceServicer.OPEN


def test_a_streaming_method_is_refused_at_start(monkeypatch):
    """Every handler is unary-unary: a streaming method added to the .proto must fail loudly, not be served wrong."""
    from google.protobuf import descriptor_pool

    from service.oip import grpc_server
    from service.oip import proto as pb

    file = descriptor_pb2.FileDescriptorProto(name="streaming.proto", package="inference", syntax="proto3")
    file.message_type.add(name="Empty")
    service = file.service.add(name="GRPCInferenceService")
    service.method.add(name="ModelStreamInfer", input_type=".inference.Empty", output_type=".inference.Empty")
    service.method[0].server_streaming = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    monkeypatch.setattr(pb, "SERVICE", pool.FindServiceByName("inference.GRPCInferenceService"))
    with pytest.raises(TypeError, match="ModelStreamInfer"):
        grpc_server.InferenceServicer(oip=None).method_handlers()  # type: ignore[arg-type]
