"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on its own port, in-process.

The server is ``grpc.aio`` on the event loop that serves HTTP (started and stopped by the app's lifespan), so a
gRPC request awaits the same coroutines as a REST one (``Classifier.probabilities``: the loop-bound leases,
queue futures and deadlines) with no second loop or thread hand-off. Blocking store reads go to threads, as in
the REST routes. The API key is the ``authorization`` metadata (``Bearer <key>``); typed errors become status
codes (``GRPC_STATUS``) with the typed code at the start of the message.

Inputs come as ``raw_input_contents`` (length-prefixed BYTES, what tritonclient sends) or as
``contents.bytes_contents``; outputs always go out as ``raw_output_contents``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import Message

from lpt.errors import LptError
from service.errors import http_status
from service.oip import proto as pb
from service.oip.codec import (
    ONE_OUTPUT,
    InferRequest,
    RequestedOutput,
    bad_request,
    bad_tensor,
    image_count,
    requested_output,
    split_bytes_elements,
)
from service.oip.frontend import InferAnswer, OpenInference, request_limit

log = logging.getLogger(__name__)

GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(exc: LptError) -> grpc.StatusCode:
    """The status code of a typed error (INTERNAL for a server error)."""
    return GRPC_STATUS.get(http_status(exc), grpc.StatusCode.INTERNAL)


def decode_infer_request(request: pb.ModelInferRequest) -> InferRequest:
    """The images and requested outputs of a ``ModelInferRequest``, checked as strictly as a REST body."""
    if len(request.inputs) != 1:
        raise bad_tensor("a request has exactly one input, 'IMAGE'", "inputs")
    tensor = request.inputs[0]
    count = image_count(tensor.name, tensor.datatype, list(tensor.shape))
    elements = list(tensor.contents.bytes_contents)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise bad_request(f"{len(request.raw_input_contents)} raw_input_contents for 1 input", "raw_input_contents")
        if elements:
            raise bad_tensor("input IMAGE has both contents and raw_input_contents")
        images = split_bytes_elements(request.raw_input_contents[0], count)
    else:
        if len(elements) != count:
            raise bad_tensor(f"input IMAGE: contents hold {len(elements)} elements, the shape {count}")
        images = elements
    if len(request.outputs) > 1:
        raise bad_tensor(ONE_OUTPUT, "outputs")
    outputs = [requested_output(o.name, True, _classification(o.parameters)) for o in request.outputs]
    return InferRequest(request.id, images, outputs or [RequestedOutput(True, 0)])


def _classification(parameters) -> object:
    """The ``classification`` parameter of a requested output: its int64 value, None when absent."""
    if "classification" not in parameters:
        return None
    param = parameters["classification"]
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which in ("int64_param", "uint64_param") else "not an integer"


def encode_infer_response(answer: InferAnswer) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=answer.task, model_version=str(answer.version), id=answer.request_id)
    response.parameters["sha256"].string_param = answer.sha256
    for tensor in answer.outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(tensor.raw())
    return response


class InferenceServicer:
    """``inference.GRPCInferenceService`` on ``OpenInference``: one method per RPC of ``SERVICE``, by its name.

    Each takes the request (after the caller's tenant, unless the call is in ``OPEN``) and returns the response;
    ``method_handlers`` adds what every call shares: the tenant from the metadata, typed errors as status codes.

    Args:
        oip: the protocol's operations.
    """

    OPEN = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})
    """The calls answered without a key, as the REST health and server metadata paths."""

    def __init__(self, oip: OpenInference):
        self.oip = oip

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """A handler for every method that ``SERVICE`` declares, by name (a call it does not answers UNIMPLEMENTED).

        Raises:
            TypeError: the service declares a streaming method (every handler here is unary-unary).
        """
        streaming = [m.name for m in pb.SERVICE.methods if m.client_streaming or m.server_streaming]
        if streaming:
            raise TypeError(f"streaming methods need streaming handlers: {streaming}")
        return {
            m.name: grpc.unary_unary_rpc_method_handler(
                self._rpc(m.name),
                request_deserializer=pb.message_class(m.input_type).FromString,
                response_serializer=pb.message_class(m.output_type).SerializeToString,
            )
            for m in pb.SERVICE.methods
        }

    def _rpc(self, name: str) -> Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]:
        method = getattr(self, name)  # a method the proto declares and this class lacks fails here, at start
        keyed = name not in self.OPEN

        async def rpc(request: Message, context: grpc.aio.ServicerContext) -> Message:
            try:
                return await (method(self._tenant(context), request) if keyed else method(request))
            except LptError as exc:
                await context.abort(grpc_status(exc), str(exc))
                raise  # abort raises; this keeps type checkers informed

        return rpc

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        metadata = {key.lower(): value for key, value in context.invocation_metadata() or ()}
        authorization = metadata.get("authorization")
        return self.oip.tenant(authorization if isinstance(authorization, str) else None)

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.oip.live)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await asyncio.to_thread(self.oip.ready))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.oip.server_metadata())

    async def ModelReady(self, tenant: str, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        ready = await asyncio.to_thread(self.oip.model_ready, tenant, request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, tenant: str, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        metadata = await asyncio.to_thread(self.oip.model_metadata, tenant, request.name, request.version)
        return pb.ModelMetadataResponse(**metadata.to_dict())

    async def ModelInfer(self, tenant: str, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        async def read_request() -> InferRequest:
            return decode_infer_request(request)

        answer = await self.oip.infer(tenant, request.model_name, request.model_version, read_request)
        return encode_infer_response(answer)

    async def RepositoryIndex(self, tenant: str, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        entries = await asyncio.to_thread(self.oip.index, tenant)
        return pb.RepositoryIndexResponse(models=[vars(e) for e in entries])

    async def RepositoryModelLoad(
        self, tenant: str, request: pb.RepositoryModelLoadRequest
    ) -> pb.RepositoryModelLoadResponse:
        await asyncio.to_thread(self.oip.load, tenant, request.model_name, dict(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, tenant: str, request: pb.RepositoryModelUnloadRequest
    ) -> pb.RepositoryModelUnloadResponse:
        await asyncio.to_thread(self.oip.unload, tenant, request.model_name, dict(request.parameters))
        return pb.RepositoryModelUnloadResponse()


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(oip: OpenInference, host: str, port: int) -> grpc.aio.Server:
    """Serve ``oip`` over gRPC on ``host:port`` (on the running event loop); fails when the port is taken."""
    limit = request_limit(oip.service.config.max_image_bytes)
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing its traffic
    ]
    server = grpc.aio.server(options=options)
    handlers = InferenceServicer(oip).method_handlers()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(pb.SERVICE.full_name, handlers)  # as protoc's stubs do: no per-call lookup
    address = listen_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise SystemExit(f"lpt-serve: cannot listen for gRPC on {address}: {exc}; choose another --grpc-port") from None
    if not bound:
        raise SystemExit(f"lpt-serve: cannot listen for gRPC on {address}; choose another --grpc-port")
    await server.start()
    log.info("Open Inference Protocol over gRPC on %s", address)
    return server
