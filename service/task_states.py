"""What this replica believes each task's state in the store is, ordered by the store's revisions.

The store numbers every state a task passes through (put, activate, delete, import) with a per-task revision
that never goes backwards (``prompts_store.base.TaskState``). States reach a replica from many directions and in
any order: its own writes, change events pushed by the store, reconcile snapshots, the read a cold load makes.
``TaskStates`` keeps, per task, the state with the highest revision it has seen and refuses every older one, so
the order in which they arrive no longer matters. A deletion is a state too (a tombstone), so a late load or a
stale event cannot bring a deleted task back.

It also remembers the sha256 of the versions it has learned of, for requests that name a version; that memory
belongs to one revision of the task and is forgotten when the task's state changes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prompts_store.base import TaskState

TaskId = tuple[str, str]  # (tenant, task)


@dataclass
class _Task:
    state: TaskState
    versions: dict[int, str] = field(default_factory=dict)  # version -> sha256, valid at ``state.revision``


class TaskStates:
    """Per-task newest known state (thread-safe). Holds every task it hears of: a few hundred bytes per task."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[TaskId, _Task] = {}

    def get(self, tenant: str, task: str) -> TaskState | None:
        """The newest state known for the task, or None when nothing was heard of it."""
        with self._lock:
            found = self._tasks.get((tenant, task))
            return None if found is None else found.state

    def apply(self, state: TaskState) -> bool:
        """Adopt ``state`` if its revision is newer than the one held; True when adopted."""
        with self._lock:
            return self._apply_locked(state)

    def replace(self, expected: TaskState | None, state: TaskState) -> bool:
        """Adopt ``state`` whatever its revision if the state held is still ``expected``; otherwise as ``apply``.

        For a replica that proved its state gone: the store cannot deliver the version held as active (data was
        lost, and the store's revisions went back with it). A state adopted meanwhile from elsewhere is newer
        knowledge than that proof, so it is only overridden by a newer revision.
        """
        with self._lock:
            held = self._tasks.get((state.tenant, state.task))
            if held is not None and held.state == expected:
                self._tasks[(state.tenant, state.task)] = _Task(state)
                return True
            return self._apply_locked(state)

    def _apply_locked(self, state: TaskState) -> bool:
        tid = (state.tenant, state.task)
        held = self._tasks.get(tid)
        if held is not None and state.revision <= held.state.revision:
            return False
        self._tasks[tid] = _Task(state)
        return True

    def is_deleted(self, tenant: str, task: str) -> bool:
        """True when the newest state known has no active version (a tombstone, or a store that lost the task)."""
        state = self.get(tenant, task)
        return state is not None and state.active is None

    def version_sha256(self, tenant: str, task: str, version: int) -> str | None:
        """The sha256 of a version learned at the task's current revision, or None."""
        with self._lock:
            found = self._tasks.get((tenant, task))
            if found is None:
                return None
            if found.state.active == version:
                return found.state.sha256
            return found.versions.get(version)

    def learn_versions(self, tenant: str, task: str, revision: int, versions: dict[int, str]) -> None:
        """Remember versions' sha256 read from the store at ``revision``; kept only while that is the task's
        revision (a read older than the state held says nothing about it)."""
        with self._lock:
            found = self._tasks.get((tenant, task))
            if found is not None and found.state.revision == revision:
                found.versions.update(versions)
