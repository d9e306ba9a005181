"""The Open Inference Protocol over the application layer: what the REST routes and the gRPC servicer both call.

A *model* is a task of the caller's tenant (another tenant's task is a missing model), a *model version* a
stored prompt-set version ("" or none: the active one). Inference goes through ``Classifier.probabilities``:
the admission, lease, decode, queue and batch of ``/v1/classify``, so one batch may hold requests of both front
ends, of any tasks and tenants.

The model repository extension makes residency visible and controllable: the index lists every stored version
with ``reason`` saying whether it is active, resident on the device and pinned; ``load`` makes the active version
resident (and, with ``pin_loaded_models``, holds it against eviction until ``unload``); ``unload`` drops the
pin and the task's resident sets (a later request loads the active set again). Every task stays inferable
whether resident or not, so every listed version is ``READY``.

Methods that read the store block (call them from a thread); ``infer`` is a coroutine on the service's loop.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import lpt
from lpt.errors import InvalidVersion, NotFound
from lpt.ids import check_task_id
from service.api.routes import MAX_VERSION
from service.application import Service
from service.errors import BadRequest, DeadlineExceeded
from service.oip.codec import InferRequest, OutputTensor, output_tensors, tensor_metadata
from service.resident import Lease, SetKey

SERVER_NAME = "lpt-serve"
PLATFORM = "lpt_prompt_set"
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository")
READY = "READY"
# Repository load and unload parameters lpt-serve does not use (tasks are uploaded through /v1/prompts).
IGNORED_REPOSITORY_PARAMETERS = frozenset({"unload_dependents"})


def request_limit(max_image_bytes: int) -> int:
    """The largest inference request body or message: as many bytes as a /v1 multipart classify may carry."""
    return max_image_bytes * 8 + 64 * 1024


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    class_count: int

    def to_dict(self) -> dict:
        image, probabilities = tensor_metadata(self.class_count)
        return {
            "name": self.name,
            "versions": self.versions,
            "platform": PLATFORM,
            "inputs": [image],
            "outputs": [probabilities],
        }


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class InferAnswer:
    """An inference response: the set that answered (task, version, sha256), the request's id and the outputs."""

    task: str
    version: int
    sha256: str
    request_id: str
    outputs: list[OutputTensor]


def parse_version(text: str | None) -> int | None:
    """A model version: None for "" (the active one), else a stored version number."""
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_VERSION:
        raise InvalidVersion(message=f"model version {text[:40]!r} is not a version number", field="version")
    return int(text)


class OpenInference:
    """The protocol's operations for one service.

    Args:
        service: the application layer (classifier, prompt sets, auth, health).
        pin_loaded_models: a repository ``load`` holds the loaded set against eviction until ``unload``.
    """

    def __init__(self, service: Service, pin_loaded_models: bool):
        self.service = service
        self.prompt_sets = service.prompt_sets
        self.pin_loaded_models = pin_loaded_models
        self._pins: dict[tuple[str, str], Lease] = {}
        self._lock = threading.Lock()

    # -- server ---------------------------------------------------------------------------------------------------
    @staticmethod
    def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": lpt.__version__, "extensions": list(EXTENSIONS)}

    @property
    def live(self) -> bool:
        return self.service.alive

    def ready(self) -> bool:
        """The service's readiness (``/readyz``); blocking, it may ping the store."""
        return bool(self.service.readiness()["ready"])

    def tenant(self, authorization: str | None) -> str:
        """The caller's tenant from an ``Authorization: Bearer`` value (Unauthorized without a valid key)."""
        return self.service.auth.tenant_for(authorization)

    # -- models ---------------------------------------------------------------------------------------------------
    def model_metadata(self, tenant: str, task: str, version: str | None) -> ModelMetadata:
        """Versions and tensors of a task (of a named version: its class count)."""
        check_task_id(task)
        number = parse_version(version)
        detail = self.prompt_sets.show(tenant, task)
        class_count = len(detail.class_names)
        if number is not None and number != detail.active_version:
            info = next((v for v in detail.versions if v.version == number), None)
            if info is None:
                raise NotFound(message=f"task {task!r} has no version {number}", field="version")
            key = SetKey(tenant, task, number, info.sha256)
            class_count = len(self.prompt_sets.cache.class_names(key))
        return ModelMetadata(task, [str(v.version) for v in detail.versions], class_count)

    def model_ready(self, tenant: str, task: str, version: str | None) -> bool:
        """Whether the service can infer with the task (version) now; NotFound when there is no such model."""
        check_task_id(task)
        self.prompt_sets.resolve(tenant, task, parse_version(version))
        return self.service.warmed_up and not self.service.draining.is_set()

    async def infer(
        self, tenant: str, task: str, version: str | None, read_request: Callable[[], Awaitable[InferRequest]]
    ) -> InferAnswer:
        """Run one inference request on the classifier's path.

        Args:
            tenant: the caller's tenant.
            task: the model name.
            version: the model version ("" or None: the active one).
            read_request: reads and decodes the request; called once the request is admitted.
        """
        check_task_id(task)
        number = parse_version(version)
        request: InferRequest | None = None

        async def read_images() -> list[bytes]:
            nonlocal request
            request = await read_request()
            return request.images

        result = await self.service.classifier.probabilities(tenant, task, number, read_images)
        assert request is not None  # read before the classifier returns
        outputs = output_tensors(result.probs, result.class_names, request.outputs)
        return InferAnswer(task, result.version, result.sha256, request.id, outputs)

    # -- model repository -----------------------------------------------------------------------------------------
    def index(self, tenant: str) -> list[IndexEntry]:
        """Every stored version of the tenant's tasks, with whether it is active, resident and pinned."""
        self._release_stale_pins()
        store = self.service.store
        out = []
        for summary in self.prompt_sets.list(tenant):
            try:
                versions = store.list_versions(tenant, summary.task)
            except NotFound:  # deleted meanwhile
                continue
            resident = {k.version for k in self.prompt_sets.cache.resident_keys(tenant, summary.task)}
            with self._lock:
                pin = self._pins.get((tenant, summary.task))
            for v in versions:
                notes = [
                    name
                    for name, on in (
                        ("active", v.version == summary.active_version),
                        ("resident", v.version in resident),
                        ("pinned", pin is not None and pin.key.version == v.version),
                    )
                    if on
                ]
                reason = ", ".join(notes) if notes else "not resident: loads on its next request"
                out.append(IndexEntry(summary.task, str(v.version), READY, reason))
        return out

    def load(self, tenant: str, task: str, parameters: dict[str, object]) -> None:
        """Make the task's active set resident now; with ``pin_loaded_models``, hold it until ``unload``."""
        check_task_id(task)
        _check_repository_parameters(parameters)
        timeout = self.service.config.request_timeout
        try:
            lease = self.prompt_sets.acquire(tenant, task, None, timeout)
        except TimeoutError as exc:
            raise DeadlineExceeded(f"loading {task!r} took longer than {timeout} s") from exc
        if not self.pin_loaded_models:
            lease.release()
            return
        with self._lock:
            previous = self._pins.pop((tenant, task), None)
            self._pins[(tenant, task)] = lease
        if previous is not None:
            previous.release()
        self._release_stale_pins()

    def unload(self, tenant: str, task: str, parameters: dict[str, object]) -> None:
        """Drop the task's pin and its resident sets (requests in flight keep theirs until they finish)."""
        check_task_id(task)
        _check_repository_parameters(parameters)
        self.prompt_sets.resolve(tenant, task)  # NotFound for a task this tenant does not have
        with self._lock:
            pin = self._pins.pop((tenant, task), None)
        if pin is not None:
            pin.release()
        self.prompt_sets.cache.discard_task(tenant, task)

    def _release_stale_pins(self) -> None:
        """Release pins whose set left the cache (its task was deleted): they would hold its memory for nothing."""
        table = self.prompt_sets.cache.table
        with self._lock:
            stale = [(owner, lease) for owner, lease in self._pins.items() if lease.key not in table]
            for owner, _ in stale:
                del self._pins[owner]
        for _, lease in stale:
            lease.release()

    def close(self) -> None:
        """Release every pin (the service stops)."""
        with self._lock:
            pins, self._pins = list(self._pins.values()), {}
        for lease in pins:
            lease.release()


def _check_repository_parameters(parameters: dict[str, object]) -> None:
    unknown = sorted(set(parameters) - IGNORED_REPOSITORY_PARAMETERS)
    if unknown:
        raise BadRequest(
            f"repository parameters {unknown} are not supported: upload prompt sets through /v1/prompts",
            "parameters",
            code="unsupported_parameter",
        )
