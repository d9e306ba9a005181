"""The store contract shared by every backend.

Versions are immutable and numbered 1, 2, 3... per (tenant, task); each is content-addressed by its
sha256. ``put`` makes the new version active. Callers validate bytes before ``put``; the store checks
ids and the size limit before it writes anything. All methods are synchronous and thread-safe; the
service calls them from worker threads.

Every write that changes a task (``put`` of new bytes, ``activate`` of another version, ``delete``,
``restore_version``) gives the task a new *revision* in the same transaction: a hybrid clock,
``max(previous + 1, now in microseconds)``, so revisions of a task only grow, also across a delete (the
revision survives as a tombstone) and across data loss (a Redis failover that lost writes, an import of an
older backup into a wiped store): the clock has moved past every revision issued before the loss. Of two
states of a task, the one with the higher revision is the later one. Only data loss can make the store hold
a state with a lower revision than one already seen (the lost write's); ``state`` and ``snapshot`` then report
what the store holds, and the task's next write gets a revision above both.

``Quotas`` bound what one tenant may store (tasks, bytes) and how many inactive versions a task keeps; a ``put``
over a quota raises ``QuotaExceeded`` and writes nothing, and a ``put`` that leaves a task with more inactive
versions than allowed deletes the oldest in its own transaction (never the active version, nor the version that
was active before it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from lpt.errors import NotFound, QuotaExceeded, StoreCorrupt, StoreUnavailable, TooLarge, VersionConflict

__all__ = [
    "ChangeEvent",
    "GcReport",
    "NotFound",
    "PromptStore",
    "QuotaExceeded",
    "Quotas",
    "StoreCorrupt",
    "StoreUnavailable",
    "StoredBlob",
    "StoredVersion",
    "Subscription",
    "SupportsMaintenance",
    "SupportsRestore",
    "TaskState",
    "TenantUsage",
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
        revision: the task's revision at the read or write that returned this version (for ``get``, read
            together with the active pointer, so it names the state the bytes belong to); not part of equality.
    """

    tenant: str
    task: str
    version: int
    sha256: str
    size: int
    created: float
    meta: dict[str, str] = field(default_factory=dict)
    new: bool = field(default=False, compare=False)
    revision: int = field(default=0, compare=False)


@dataclass(frozen=True)
class StoredBlob:
    """One stored version: its record and the encoded prompt-set bytes (``lpt.prompt_set`` format) as uploaded."""

    info: StoredVersion
    data: bytes


@dataclass(frozen=True)
class TaskState:
    """What the store holds for one task at one revision: the active version and its sha256 (both None once
    the task is deleted: a tombstone).

    A task the store has never held (or lost entirely) is ``TaskState(tenant, task, 0, None, None)``; a task
    written before the store had revisions reads as revision 0 with its active version until its next write.

    Attributes:
        tenant: owner namespace.
        task: task id.
        revision: the task's hybrid-clock revision (see the module docstring); 0 for no revision.
        active: the active version, None when the task does not exist.
        sha256: hex digest of the active version's bytes, None when the task does not exist.
    """

    tenant: str
    task: str
    revision: int
    active: int | None
    sha256: str | None


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits and per-task retention; ``None`` means no limit.

    Attributes:
        max_tasks_per_tenant: most tasks a tenant may hold; creating one more raises ``QuotaExceeded``.
        max_bytes_per_tenant: most bytes a tenant may store, counting each distinct blob of each of its tasks
            once (every version kept, active or not); an upload that would pass it raises ``QuotaExceeded``.
        keep_inactive_versions: inactive versions a task keeps; the upload that passes it deletes the oldest.
            The version that was active before the current one is always kept (and counts as one of them).
    """

    max_tasks_per_tenant: int | None = None
    max_bytes_per_tenant: int | None = None
    keep_inactive_versions: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_tasks_per_tenant", "max_bytes_per_tenant", "keep_inactive_versions"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")


@dataclass(frozen=True)
class TenantUsage:
    """What one tenant stores: live tasks, and bytes (each distinct blob of each task once)."""

    tasks: int
    bytes: int


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` did: tasks it pruned, versions it deleted and the bytes they freed."""

    tasks_pruned: int = 0
    versions_deleted: int = 0
    bytes_freed: int = 0

    def __add__(self, other: GcReport) -> GcReport:
        """Both reports together (a store's ``gc`` sums its tasks' reports)."""
        return GcReport(
            self.tasks_pruned + other.tasks_pruned,
            self.versions_deleted + other.versions_deleted,
            self.bytes_freed + other.bytes_freed,
        )


# Change events are states ("task X is now at state S"), so a consumer can compare revisions.
ChangeEvent = TaskState


class Subscription(Protocol):
    def close(self) -> None: ...


@runtime_checkable
class PromptStore(Protocol):
    """What the service and the CLI need from a store. Raises NotFound, TooLarge, InvalidId, QuotaExceeded (``put``),
    StoreUnavailable."""

    max_bytes: int

    def put(self, tenant: str, task: str, data: bytes, meta: dict[str, str] | None = None) -> StoredVersion:
        """Store ``data`` as a new version and activate it (``new`` set, a new revision); bytes equal to the
        active one return it at the current revision, writing nothing."""
        ...

    def get(self, tenant: str, task: str, version: int | None = None) -> StoredBlob:
        """The active version (or the given one), bytes and metadata; ``info.revision`` is the task's revision
        read together with the active pointer."""
        ...

    def active_version(self, tenant: str, task: str) -> StoredVersion:
        """Metadata of the active version, without the bytes."""
        ...

    def list_tasks(self, tenant: str) -> list[str]: ...

    def list_versions(self, tenant: str, task: str) -> list[StoredVersion]: ...

    def list_tenants(self) -> list[str]: ...

    def activate(self, tenant: str, task: str, version: int) -> StoredVersion:
        """Make an existing version active (rollback or roll forward) at a new revision; activating the version
        that is already active writes nothing and keeps the revision."""
        ...

    def delete(self, tenant: str, task: str) -> None:
        """Delete a task and all its versions; its revision survives, bumped, as a tombstone."""
        ...

    def state(self, tenant: str, task: str) -> TaskState:
        """The task's revision, active version and sha256 in one cheap consistent read (no bytes); a deleted
        task returns its tombstone, an unknown one revision 0."""
        ...

    def snapshot(self) -> dict[tuple[str, str], TaskState]:
        """Every (tenant, task) -> its state, tombstones included: what reconciliation diffs against."""
        ...

    def subscribe(self, callback: Callable[[ChangeEvent], None], reconcile_s: float = 2.0) -> Subscription:
        """Call ``callback`` from a background thread with the task's new state on every change (push where
        the backend has it), and re-derive changes from ``snapshot`` every ``reconcile_s`` so missed messages
        are recovered."""
        ...

    def ping(self) -> None:
        """Raise StoreUnavailable when the backend cannot be reached."""
        ...

    def close(self) -> None: ...


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
        version. A task created by a restore is active at that version until ``activate`` says otherwise.
        A write gives the task a new revision (from the clock, so above every revision the store issued
        before a wipe)."""
        ...


@runtime_checkable
class SupportsMaintenance(Protocol):
    """Usage and retention for the operator (``lpt store usage``, ``lpt store gc``); both bundled backends have it."""

    def usage(self, tenant: str) -> TenantUsage:
        """The tenant's live tasks and stored bytes, as the quotas count them."""
        ...

    def gc(self, keep_inactive_versions: int | None) -> GcReport:
        """Apply retention to every task (``None``: the store's own ``Quotas.keep_inactive_versions``): delete
        all inactive versions but the newest ``keep_inactive_versions``, never the active version nor the one
        active before it, and bring the usage counters up to date. Deleting inactive versions changes no task's
        state, so no revision moves."""
        ...
