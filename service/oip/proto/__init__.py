"""The Open Inference Protocol's gRPC messages and service, read from ``open_inference.binpb``: the descriptor set
that ``scripts/compile_oip_proto.py`` compiles from ``open_inference.proto`` (both committed; no generated Python).

The messages live in a descriptor pool of their own (``POOL``), not protobuf's process-wide default one: every
implementation of the protocol calls them ``inference.*``, so a process that also loads another copy (tritonclient's,
in the tests; an embedding application's) would otherwise fail with "duplicate symbol". Each message class is an
attribute of this module under its protocol name (``pb.ModelInferRequest``; nested ones on their message,
``pb.ModelInferRequest.InferInputTensor``); ``SERVICE`` is ``inference.GRPCInferenceService``'s descriptor, which
the server's handlers and ``client`` follow.
"""

from __future__ import annotations

from importlib import resources
from types import SimpleNamespace

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

POOL = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(
    resources.files(__name__).joinpath("open_inference.binpb").read_bytes()
).file:
    POOL.Add(_file)

FILE = POOL.FindFileByName("open_inference.proto")
SERVICE: ServiceDescriptor = POOL.FindServiceByName("inference.GRPCInferenceService")


def message_class(descriptor: Descriptor) -> type[Message]:
    """The message class of a descriptor of ``POOL`` (one class per descriptor, however often asked)."""
    return GetMessageClass(descriptor)


def __getattr__(name: str) -> type[Message]:
    """The protocol's top-level messages as attributes of this module (``pb.ModelInferRequest``)."""
    descriptor = FILE.message_types_by_name.get(name)
    if descriptor is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return message_class(descriptor)


def client(channel: grpc.Channel | grpc.aio.Channel) -> SimpleNamespace:
    """The service's calls on ``channel`` (sync or ``grpc.aio``) by method name, as a generated stub has them.

    Args:
        channel: a channel to a server of ``inference.GRPCInferenceService``.

    Returns:
        ``client(channel).ModelInfer(request, metadata=..., timeout=...)`` and so on for each method of ``SERVICE``.
    """
    return SimpleNamespace(
        **{
            m.name: channel.unary_unary(
                f"/{SERVICE.full_name}/{m.name}",
                request_serializer=message_class(m.input_type).SerializeToString,
                response_deserializer=message_class(m.output_type).FromString,
            )
            for m in SERVICE.methods
        }
    )
