"""The store contract shared by every backend.

Versions are immutable and numbered 1, 2, 3... per (tenant, task); each is content-addressed by its
sha256. ``put`` makes the new version active. Callers validate bytes before ``put``; the store checks
ids and the size limit before it writes anything. All methods are synchronous and thread-safe; the
service calls them from worker threads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from lpt.errors import LptError, NotFound, StoreCorrupt, StoreUnavailable, TooLarge
from lpt.prompt_set import MAX_PROMPT_BYTES

DEFAULT_MAX_BYTES = MAX_PROMPT_BYTES

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ChangeEvent",
    "NotFound",
    "PromptStore",
    "StoreCorrupt",
    "StoreUnavailable",
    "StoredBlob",
    "StoredVersion",
    "Subscription",
    "SupportsRestore",
    "TooLarge",
    "VersionConflict",
]


@dataclass(frozen=True)
class StoredVersion:
    """Metadata of one immutable version.

    Attributes:
        tenant: owner namespace.
        task: task id.
        version: 1, 2, 3... per task.
        sha256: hex digest of the bytes.
        size: byte length.
        created: unix time (seconds) the version was written.
        meta: small string metadata given at put time (e.g. num_classes), returned as-is.
        new: True only on the answer of the ``put`` that wrote this version (False for an idempotent hit and on
            every read); not part of equality.
    """

    tenant: str
    task: str
    version: int
    sha256: str
    size: int
    created: float
    meta: dict[str, str] = field(default_factory=dict)
    new: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class StoredBlob:
    info: StoredVersion
    data: bytes


@dataclass(frozen=True)
class ChangeEvent:
    """The active version of a task changed; ``active`` is None when the task was deleted."""

    tenant: str
    task: str
    active: int | None


class Subscription(Protocol):
    def close(self) -> None: ...


@runtime_checkable
class PromptStore(Protocol):
    """What the service and the CLI need from a store. Raises NotFound, TooLarge, InvalidTaskId, StoreUnavailable."""

    max_bytes: int

    def put(self, tenant: str, task: str, data: bytes, meta: dict[str, str] | None = None) -> StoredVersion:
        """Store ``data`` as a new version and activate it (``new`` set); bytes equal to the active one return it."""
        ...

    def get(self, tenant: str, task: str, version: int | None = None) -> StoredBlob:
        """The active version (or the given one), bytes and metadata."""
        ...

    def active_version(self, tenant: str, task: str) -> StoredVersion:
        """Metadata of the active version, without the bytes."""
        ...

    def list_tasks(self, tenant: str) -> list[str]: ...

    def list_versions(self, tenant: str, task: str) -> list[StoredVersion]: ...

    def list_tenants(self) -> list[str]: ...

    def activate(self, tenant: str, task: str, version: int) -> StoredVersion:
        """Make an existing version active (rollback or roll forward)."""
        ...

    def delete(self, tenant: str, task: str) -> None:
        """Delete a task and all its versions."""
        ...

    def snapshot(self) -> dict[tuple[str, str], int]:
        """Every (tenant, task) -> active version: what reconciliation diffs against."""
        ...

    def subscribe(self, callback: Callable[[ChangeEvent], None], reconcile_s: float = 2.0) -> Subscription:
        """Call ``callback`` from a background thread on every change (push where the backend has it),
        and re-derive changes from ``snapshot`` every ``reconcile_s`` so missed messages are recovered."""
        ...

    def ping(self) -> None:
        """Raise StoreUnavailable when the backend cannot be reached."""
        ...

    def close(self) -> None: ...


class VersionConflict(LptError):
    """A restored version number already exists with different bytes (import into a non-empty store)."""

    code = "version_conflict"


@runtime_checkable
class SupportsRestore(Protocol):
    """Backup import (``lpt store import``): recreate versions with their original numbers and times.

    Not part of ``PromptStore`` because the service never needs it; both bundled backends implement it.
    """

    def restore_version(
        self, tenant: str, task: str, version: int, data: bytes, created: float, meta: dict[str, str] | None = None
    ) -> StoredVersion:
        """Write version ``version`` of a task unless it exists with the same sha256 (then return it); raise
        VersionConflict if it exists with other bytes. Later ``put``s number after the highest restored
        version. A task created by a restore is active at that version until ``activate`` says otherwise."""
        ...
