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
from typing import TypeVar

import grpc

from lpt.errors import LptError
from service.errors import http_status
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
from service.oip.proto import open_inference_pb2 as pb
from service.oip.proto import open_inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

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


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` on ``OpenInference``.

    Args:
        oip: the protocol's operations.
    """

    def __init__(self, oip: OpenInference):
        self.oip = oip

    async def _answer(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except LptError as exc:
            await context.abort(grpc_status(exc), str(exc))
            raise  # abort raises; this keeps type checkers informed

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        metadata = {key.lower(): value for key, value in context.invocation_metadata() or ()}
        authorization = metadata.get("authorization")
        return self.oip.tenant(authorization if isinstance(authorization, str) else None)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.oip.live)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await asyncio.to_thread(self.oip.ready))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.oip.server_metadata())

    async def ModelReady(self, request, context):
        async def call() -> pb.ModelReadyResponse:
            tenant = self._tenant(context)
            ready = await asyncio.to_thread(self.oip.model_ready, tenant, request.name, request.version)
            return pb.ModelReadyResponse(ready=ready)

        return await self._answer(context, call)

    async def ModelMetadata(self, request, context):
        async def call() -> pb.ModelMetadataResponse:
            tenant = self._tenant(context)
            metadata = await asyncio.to_thread(self.oip.model_metadata, tenant, request.name, request.version)
            return pb.ModelMetadataResponse(**metadata.to_dict())

        return await self._answer(context, call)

    async def ModelInfer(self, request, context):
        async def call() -> pb.ModelInferResponse:
            tenant = self._tenant(context)

            async def read_request() -> InferRequest:
                return decode_infer_request(request)

            answer = await self.oip.infer(tenant, request.model_name, request.model_version, read_request)
            return encode_infer_response(answer)

        return await self._answer(context, call)

    async def RepositoryIndex(self, request, context):
        async def call() -> pb.RepositoryIndexResponse:
            entries = await asyncio.to_thread(self.oip.index, self._tenant(context))
            return pb.RepositoryIndexResponse(models=[vars(e) for e in entries])

        return await self._answer(context, call)

    async def RepositoryModelLoad(self, request, context):
        async def call() -> pb.RepositoryModelLoadResponse:
            tenant = self._tenant(context)
            await asyncio.to_thread(self.oip.load, tenant, request.model_name, dict(request.parameters))
            return pb.RepositoryModelLoadResponse()

        return await self._answer(context, call)

    async def RepositoryModelUnload(self, request, context):
        async def call() -> pb.RepositoryModelUnloadResponse:
            tenant = self._tenant(context)
            await asyncio.to_thread(self.oip.unload, tenant, request.model_name, dict(request.parameters))
            return pb.RepositoryModelUnloadResponse()

        return await self._answer(context, call)


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
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(oip), server)
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
