"""What one Redis transaction of the store works with: a task's hash as read under WATCH (``TaskRecord``, with its
``state`` field's encoding) and the pooled connection the transaction runs on, from WATCH to EXEC and the ``WAIT``
after it (``Session``). ``redis_store`` holds the transactions themselves; the key layout is documented there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis

from prompts_store._common import decode_info, unknown_state
from prompts_store.base import StoredVersion, TaskState


@dataclass
class TaskRecord:
    """A task's hash as read under WATCH: its state and its versions' raw metadata."""

    tenant: str
    task: str
    revision: int = 0
    active: int | None = None
    sha256: str | None = None
    previous: int | None = None
    last: int = 0
    raw_state: bytes | None = None
    versions: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def parse(cls, tenant: str, task: str, fields: dict[bytes, bytes]) -> TaskRecord:
        rec = cls(tenant, task, versions={int(k[2:]): v for k, v in fields.items() if k.startswith(b"v:")})
        raw = fields.get(b"state")
        if raw is not None:
            d = json.loads(raw)
            rec.revision, rec.active, rec.sha256 = int(d["revision"]), d["active"], d["sha256"]
            rec.previous, rec.last, rec.raw_state = d.get("previous"), int(d.get("last", 0)), raw
        rec.last = max([rec.last, *rec.versions])
        return rec

    @property
    def state(self) -> TaskState:
        return TaskState(self.tenant, self.task, self.revision, self.active, self.sha256)

    def info(self, version: int, revision: int | None = None) -> StoredVersion:
        rev = self.revision if revision is None else revision
        return decode_info(self.tenant, self.task, version, self.versions[version], rev)

    def blobs(self) -> dict[int, tuple[str, int]]:
        """version -> (sha256, size)."""
        out = {}
        for v, raw in self.versions.items():
            d = json.loads(raw)
            out[v] = (d["sha256"], int(d["size"]))
        return out


def encode_state(revision: int, active: int | None, sha: str | None, previous: int | None, last: int) -> str:
    return json.dumps({"revision": revision, "active": active, "sha256": sha, "previous": previous, "last": last})


def decode_state(tenant: str, task: str, raw: bytes | None) -> TaskState:
    if raw is None:
        return unknown_state(tenant, task)
    d = json.loads(raw)
    return TaskState(tenant, task, int(d["revision"]), d["active"], d["sha256"])


class Session:
    """One pooled connection held from WATCH to EXEC and the ``WAIT`` after it (``WAIT`` counts the replicas that
    acknowledged this connection's writes). Replies are raw (no redis-py reply callbacks).

    Args:
        client: a client of the primary the transaction runs on.
    """

    def __init__(self, client: redis.Redis):
        self._pool = client.connection_pool
        self._conn: Any = None
        self._watching = False

    def __enter__(self) -> Session:
        self._conn = self._pool.get_connection()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        conn, self._conn = self._conn, None
        if isinstance(exc_type, type) and issubclass(exc_type, redis.RedisError | OSError):
            conn.disconnect()  # the reply stream may be mid-way; a new connection also drops the WATCH
        elif self._watching:
            try:
                conn.send_command("UNWATCH")
                conn.read_response()
            except (redis.RedisError, OSError):
                conn.disconnect()
        self._pool.release(conn)

    def __call__(self, *args: Any) -> Any:
        self._conn.send_command(*args)
        reply = self._conn.read_response()
        if args[0] == "WATCH":
            self._watching = True
        elif args[0] == "UNWATCH":
            self._watching = False
        return reply

    def execute(self, commands: list[tuple[Any, ...]]) -> list[Any] | None:
        """MULTI, the commands and EXEC in one send; None when a watched key changed (nothing was applied)."""
        self._conn.send_packed_command(self._conn.pack_commands([("MULTI",), *commands, ("EXEC",)]))
        queued: list[Exception] = []
        reply: Any = None
        for _ in range(len(commands) + 2):  # read every reply, so the connection stays in step
            try:
                reply = self._conn.read_response()
            except redis.ResponseError as e:  # refused at queue time (ACL, MOVED); EXEC then aborts
                queued.append(e)
        self._watching = False
        if queued:
            raise queued[0]
        if reply is None:
            return None
        failed = [r for r in reply if isinstance(r, Exception)]
        if failed:
            raise failed[0]
        return reply

    def time_us(self) -> int:
        seconds, micros = self("TIME")
        return int(seconds) * 1_000_000 + int(micros)
