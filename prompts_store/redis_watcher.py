"""The Redis backend's change watcher: pub/sub messages as they are published, and a snapshot diff to recover
the ones a disconnected replica missed (``prompts_store._common.Watcher`` owns the loop)."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Protocol

from lpt.errors import InvalidId
from lpt.ids import check_task_id, check_tenant_id
from prompts_store._common import Snapshot, Watcher, log
from prompts_store.base import ChangeEvent, TaskState


class ChangeSource(Protocol):
    """What the watcher needs of the store: its channel, a pub/sub connection and a snapshot."""

    channel: str

    def pubsub(self) -> Any: ...

    def snapshot(self) -> Snapshot: ...


class RedisWatcher(Watcher):
    """Change events of a Redis store: its pub/sub channel, and its snapshot for reconciliation."""

    def __init__(self, store: ChangeSource, callback: Callable[[ChangeEvent], None], reconcile_s: float):
        super().__init__(callback, reconcile_s, name="lpt-store-watch-redis")
        self._store = store
        self._pubsub: Any = None

    def _wait(self, timeout: float) -> tuple[list[ChangeEvent], bool]:
        due = False
        if self._pubsub is None:
            ps = self._store.pubsub()
            self._pubsub = ps
            ps.subscribe(self._store.channel)
            due = True  # messages published while we were not subscribed are lost: diff a snapshot now
        events: list[ChangeEvent] = []
        msg = self._pubsub.get_message(timeout=timeout)
        while msg is not None and len(events) < 10_000:
            if msg.get("type") == "message":
                ev = _parse_message(msg["data"])
                if ev is None:
                    due = True  # something changed, but the message does not say what: a snapshot diff will
                else:
                    events.append(ev)
            msg = self._pubsub.get_message(timeout=0)
        return events, due

    def _snapshot(self) -> Snapshot:
        return self._store.snapshot()

    def _reset(self) -> None:
        ps, self._pubsub = self._pubsub, None
        if ps is not None:
            # Closing a broken connection may fail; it is discarded either way.
            with suppress(Exception):
                ps.close()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _well_formed(state: TaskState) -> bool:
    """A revision >= 0, and a version >= 1 with a sha256 (live) or neither (tombstone)."""
    if not _is_int(state.revision) or state.revision < 0:
        return False
    if state.active is None:
        return state.sha256 is None
    return _is_int(state.active) and state.active >= 1 and isinstance(state.sha256, str)


def _parse_message(data: bytes | str) -> ChangeEvent | None:
    """The state a change message carries, or None when it carries none: a message from a writer that predates
    revisions ({tenant, task, active}), or anything malformed (anyone with access can publish on the channel)."""
    try:
        d = json.loads(data)
        if isinstance(d, dict) and "active" in d and "revision" not in d:
            log.debug("change message without a revision (a writer from before revisions): %r", data)
            return None
        state = TaskState(
            check_tenant_id(d["tenant"]), check_task_id(d["task"]), d["revision"], d["active"], d["sha256"]
        )
        if _well_formed(state):
            return state
    except (ValueError, KeyError, TypeError, InvalidId):
        pass
    log.warning("ignoring malformed prompt store change message: %r", data)
    return None
