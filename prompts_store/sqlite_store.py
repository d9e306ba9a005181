"""Embedded backend: one SQLite file in WAL mode, for a single machine (one or several processes).

Tables::

    tasks(tenant, task, active)                        the active pointer; a row exists iff the task exists
    versions(tenant, task, version, sha256, size, created, meta)
    blobs(tenant, task, sha256, data)                  content-addressed inside the task
    seqs(tenant, task, last, revision)                 last version issued and the task's revision; written by
                                                       every put and restore, kept on delete (the tombstone),
                                                       so numbers never repeat and revisions never go back

Every write is one ``BEGIN IMMEDIATE`` transaction (writers serialize on SQLite's lock, readers never block),
committed with ``synchronous=FULL``: an acknowledged put survives a process kill and a power loss. Change
notification polls ``PRAGMA data_version`` (cheap, changes when another connection commits) every 0.1 s.
Keep the file on a local disk: WAL needs shared memory, so network filesystems are not supported.

A file whose ``seqs`` lacks ``revision`` (written before the store had revisions) gets the column on open, in
place, with 0 for every task; each task's next write gives it a clock-based revision.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

from lpt.errors import NotFound, StoreUnavailable
from lpt.ids import check_tenant_id
from prompts_store._common import (
    Snapshot,
    Watcher,
    check_ids,
    check_put,
    check_version,
    log,
    next_revision,
    sha256_hex,
    verify_blob,
)
from prompts_store.base import DEFAULT_MAX_BYTES, ChangeEvent, StoredBlob, StoredVersion, TaskState, VersionConflict

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    tenant TEXT NOT NULL, task TEXT NOT NULL, active INTEGER NOT NULL, PRIMARY KEY (tenant, task)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    tenant TEXT NOT NULL, task TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, created REAL NOT NULL, meta TEXT NOT NULL, PRIMARY KEY (tenant, task, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    tenant TEXT NOT NULL, task TEXT NOT NULL, sha256 TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (tenant, task, sha256)
);
CREATE TABLE IF NOT EXISTS seqs (
    tenant TEXT NOT NULL, task TEXT NOT NULL, last INTEGER NOT NULL, revision INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, task)
) WITHOUT ROWID;
"""
_ADD_REVISION = "ALTER TABLE seqs ADD COLUMN revision INTEGER NOT NULL DEFAULT 0"

# Version columns plus the task's revision, read in the same statement (one consistent snapshot).
_COLS = "SELECT v.version, v.sha256, v.size, v.created, v.meta, COALESCE(s.revision, 0)"
_JOIN_SEQ = " LEFT JOIN seqs s ON s.tenant = v.tenant AND s.task = v.task"
_INFO = f"{_COLS} FROM versions v{_JOIN_SEQ}"
_BLOB = (
    f"{_COLS}, b.data FROM versions v JOIN blobs b ON b.tenant = v.tenant AND b.task = v.task AND b.sha256 = v.sha256"
    f"{_JOIN_SEQ}"
)
_JOIN_ACTIVE = " JOIN tasks t ON t.tenant = v.tenant AND t.task = v.task AND t.active = v.version"
_STATE = """
SELECT COALESCE((SELECT revision FROM seqs WHERE tenant = ?1 AND task = ?2), 0), t.active, v.sha256
FROM (SELECT 1) LEFT JOIN tasks t ON t.tenant = ?1 AND t.task = ?2
LEFT JOIN versions v ON v.tenant = t.tenant AND v.task = t.task AND v.version = t.active
"""
# Live tasks, then tombstones (a seqs row without a task; revision 0 ones predate revisions and say nothing).
_SNAPSHOT = """
SELECT t.tenant, t.task, COALESCE(s.revision, 0), t.active, v.sha256 FROM tasks t
LEFT JOIN seqs s ON s.tenant = t.tenant AND s.task = t.task
LEFT JOIN versions v ON v.tenant = t.tenant AND v.task = t.task AND v.version = t.active
UNION ALL
SELECT s.tenant, s.task, s.revision, NULL, NULL FROM seqs s
WHERE s.revision > 0 AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.tenant = s.tenant AND t.task = s.task)
"""
_POLL_S = 0.1


def _row_info(tenant: str, task: str, row: tuple) -> StoredVersion:
    return StoredVersion(
        tenant, task, int(row[0]), row[1], int(row[2]), float(row[3]), json.loads(row[4]), revision=int(row[5])
    )


def _read_snapshot(conn: sqlite3.Connection) -> Snapshot:
    return {(t, k): TaskState(t, k, int(r), a, sha) for t, k, r, a, sha in conn.execute(_SNAPSHOT).fetchall()}


class SqlitePromptStore:
    """Prompt store in one SQLite file. Thread-safe (a connection per thread) and multi-process safe.

    Args:
        path: the database file; its directory is created (mode 0700) if missing.
        max_bytes: largest blob ``put`` accepts.
        busy_timeout_s: how long a writer waits for another writer's lock before ``StoreUnavailable``.
    """

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn = self._conn()
            # WAL is a property of the file: set once, every later connection (any process) uses it.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable("store_unavailable", f"cannot enable WAL on {self.path} (got {mode})")
            with self._write(conn):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                if "revision" not in {row[1] for row in conn.execute("PRAGMA table_info(seqs)")}:
                    conn.execute(_ADD_REVISION)  # a store from before revisions: every task starts at 0
        except (sqlite3.Error, OSError) as e:
            raise StoreUnavailable("store_unavailable", f"cannot open sqlite store {self.path}: {e}") from e

    def __repr__(self) -> str:
        return f"SqlitePromptStore({str(self.path)!r})"

    # -- connections --------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreUnavailable("store_unavailable", "store is closed")
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE for writes), never implicit.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _write(self, conn: sqlite3.Connection) -> Iterator[None]:
        """One write transaction; the lock is taken up front so two writers never deadlock on an upgrade.

        Threads of this process queue on a Python lock first: SQLite's busy handler sleeps in growing steps
        (up to 100 ms), which made 50 concurrent puts take seconds; other processes still use busy_timeout.
        """
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _unavailable(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise StoreUnavailable("store_unavailable", f"sqlite {what} failed ({self.path}): {e}") from e

    @staticmethod
    def _active_row(conn: sqlite3.Connection, tenant: str, task: str) -> tuple | None:
        return conn.execute(f"{_INFO}{_JOIN_ACTIVE} WHERE t.tenant = ? AND t.task = ?", (tenant, task)).fetchone()

    @staticmethod
    def _write_version(conn: sqlite3.Connection, tenant: str, task: str, info: StoredVersion, data: bytes) -> None:
        conn.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?)", (tenant, task, info.sha256, data))
        conn.execute(
            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
            (tenant, task, info.version, info.sha256, info.size, info.created, json.dumps(info.meta)),
        )

    @staticmethod
    def _read_seq(conn: sqlite3.Connection, tenant: str, task: str) -> tuple[int, int]:
        """(last version issued, revision) of a task; (0, 0) for a task never written."""
        row = conn.execute("SELECT last, revision FROM seqs WHERE tenant = ? AND task = ?", (tenant, task)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    @staticmethod
    def _write_seq(conn: sqlite3.Connection, tenant: str, task: str, last: int, revision: int) -> None:
        conn.execute(
            "INSERT INTO seqs VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO UPDATE SET last = excluded.last, revision = excluded.revision",
            (tenant, task, last, revision),
        )

    # -- writes -------------------------------------------------------------------------------------
    def put(self, tenant: str, task: str, data: bytes, meta: dict[str, str] | None = None) -> StoredVersion:
        """Store ``data`` as a new version and activate it; bytes equal to the active version return it."""
        check_ids(tenant, task)
        meta = check_put(data, meta, self.max_bytes)
        data = bytes(data)
        sha = sha256_hex(data)
        with self._unavailable("put"):
            conn = self._conn()
            with self._write(conn):
                row = self._active_row(conn, tenant, task)
                if row is not None and row[1] == sha:
                    return _row_info(tenant, task, row)
                last, revision = self._read_seq(conn, tenant, task)
                revision = next_revision(revision)
                info = StoredVersion(
                    tenant, task, last + 1, sha, len(data), time.time(), meta, new=True, revision=revision
                )
                self._write_version(conn, tenant, task, info, data)
                self._write_seq(conn, tenant, task, info.version, info.revision)
                conn.execute(
                    "INSERT INTO tasks VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET active = excluded.active",
                    (tenant, task, info.version),
                )
            return info

    def activate(self, tenant: str, task: str, version: int) -> StoredVersion:
        """Make an existing version active at a new revision; the active version itself writes nothing."""
        check_ids(tenant, task)
        check_version(version)
        with self._unavailable("activate"):
            conn = self._conn()
            with self._write(conn):
                row = conn.execute(
                    f"{_INFO} WHERE v.tenant = ? AND v.task = ? AND v.version = ?", (tenant, task, version)
                ).fetchone()
                if row is None:
                    raise NotFound("not_found", f"task {task!r} has no version {version}", "version")
                info = _row_info(tenant, task, row)
                active = conn.execute("SELECT active FROM tasks WHERE tenant = ? AND task = ?", (tenant, task))
                if active.fetchone() == (version,):
                    return info
                last, revision = self._read_seq(conn, tenant, task)
                info = replace(info, revision=next_revision(revision))
                conn.execute("UPDATE tasks SET active = ? WHERE tenant = ? AND task = ?", (version, tenant, task))
                self._write_seq(conn, tenant, task, last, info.revision)
            return info

    def delete(self, tenant: str, task: str) -> None:
        """Delete a task, all its versions and blobs. Its version numbers are not reused; its revision is bumped
        and kept (the tombstone)."""
        check_ids(tenant, task)
        with self._unavailable("delete"):
            conn = self._conn()
            with self._write(conn):
                if conn.execute("DELETE FROM tasks WHERE tenant = ? AND task = ?", (tenant, task)).rowcount == 0:
                    raise NotFound("not_found", f"task {task!r} does not exist", "task")
                conn.execute("DELETE FROM versions WHERE tenant = ? AND task = ?", (tenant, task))
                conn.execute("DELETE FROM blobs WHERE tenant = ? AND task = ?", (tenant, task))
                last, revision = self._read_seq(conn, tenant, task)
                self._write_seq(conn, tenant, task, last, next_revision(revision))

    def restore_version(
        self, tenant: str, task: str, version: int, data: bytes, created: float, meta: dict[str, str] | None = None
    ) -> StoredVersion:
        """Write a version with a given number (backup import). See ``base.SupportsRestore``."""
        check_ids(tenant, task)
        check_version(version)
        meta = check_put(data, meta, self.max_bytes)
        data = bytes(data)
        info = StoredVersion(tenant, task, version, sha256_hex(data), len(data), created, meta)
        with self._unavailable("restore"):
            conn = self._conn()
            with self._write(conn):
                row = conn.execute(
                    f"{_INFO} WHERE v.tenant = ? AND v.task = ? AND v.version = ?", (tenant, task, version)
                ).fetchone()
                if row is not None:
                    if row[1] != info.sha256:
                        raise VersionConflict(
                            "version_conflict", f"{tenant}/{task} v{version} exists with other bytes", "version"
                        )
                    return _row_info(tenant, task, row)
                last, revision = self._read_seq(conn, tenant, task)
                info = replace(info, revision=next_revision(revision))
                self._write_version(conn, tenant, task, info, data)
                self._write_seq(conn, tenant, task, max(version, last), info.revision)
                conn.execute("INSERT OR IGNORE INTO tasks VALUES (?, ?, ?)", (tenant, task, version))
            return info

    # -- reads --------------------------------------------------------------------------------------
    def get(self, tenant: str, task: str, version: int | None = None) -> StoredBlob:
        """The active version (or the given one), checksum-verified bytes and metadata."""
        check_ids(tenant, task)
        if version is not None:
            check_version(version)
        with self._unavailable("get"):
            conn = self._conn()
            # One statement, so pointer, metadata and bytes come from the same consistent snapshot.
            if version is None:
                sql, args = f"{_BLOB}{_JOIN_ACTIVE} WHERE t.tenant = ? AND t.task = ?", (tenant, task)
            else:
                sql, args = f"{_BLOB} WHERE v.tenant = ? AND v.task = ? AND v.version = ?", (tenant, task, version)
            row = conn.execute(sql, args).fetchone()
        if row is None:
            what = f"version {version}" if version is not None else "active version"
            raise NotFound("not_found", f"task {task!r} has no {what}", "version" if version else "task")
        info = _row_info(tenant, task, row)
        data = bytes(row[6])
        verify_blob(info, data)
        return StoredBlob(info, data)

    def active_version(self, tenant: str, task: str) -> StoredVersion:
        check_ids(tenant, task)
        with self._unavailable("active_version"):
            row = self._active_row(self._conn(), tenant, task)
        if row is None:
            raise NotFound("not_found", f"task {task!r} does not exist", "task")
        return _row_info(tenant, task, row)

    def list_tasks(self, tenant: str) -> list[str]:
        check_tenant_id(tenant)
        with self._unavailable("list_tasks"):
            rows = self._conn().execute("SELECT task FROM tasks WHERE tenant = ? ORDER BY task", (tenant,)).fetchall()
        return [r[0] for r in rows]

    def list_tenants(self) -> list[str]:
        with self._unavailable("list_tenants"):
            rows = self._conn().execute("SELECT DISTINCT tenant FROM tasks ORDER BY tenant").fetchall()
        return [r[0] for r in rows]

    def list_versions(self, tenant: str, task: str) -> list[StoredVersion]:
        check_ids(tenant, task)
        with self._unavailable("list_versions"):
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                exists = conn.execute("SELECT 1 FROM tasks WHERE tenant = ? AND task = ?", (tenant, task)).fetchone()
                rows = conn.execute(
                    f"{_INFO} WHERE v.tenant = ? AND v.task = ? ORDER BY v.version", (tenant, task)
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        if exists is None:
            raise NotFound("not_found", f"task {task!r} does not exist", "task")
        return [_row_info(tenant, task, r) for r in rows]

    def state(self, tenant: str, task: str) -> TaskState:
        """The task's revision, active version and its sha256 from one statement; a tombstone once deleted."""
        check_ids(tenant, task)
        with self._unavailable("state"):
            revision, active, sha = self._conn().execute(_STATE, (tenant, task)).fetchone()
        return TaskState(tenant, task, int(revision), active, sha)

    def snapshot(self) -> Snapshot:
        with self._unavailable("snapshot"):
            return _read_snapshot(self._conn())

    def ping(self) -> None:
        with self._unavailable("ping"):
            self._conn().execute("SELECT 1 FROM tasks LIMIT 1").fetchall()

    # -- notifications ------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[ChangeEvent], None], reconcile_s: float = 2.0) -> _SqliteWatcher:
        """Poll for commits by any connection (this process or another) every 0.1 s and deliver the diff;
        a full snapshot diff also runs every ``reconcile_s``. Never raises for a store error: it retries."""
        watcher = _SqliteWatcher(self, callback, reconcile_s)
        try:
            baseline: Snapshot | None = self.snapshot()
        except StoreUnavailable as e:
            log.warning("prompt store unreadable at subscribe; the first snapshot will be delivered in full: %s", e)
            baseline = None
        watcher.start(baseline)
        return watcher

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with suppress(sqlite3.Error):
                conn.close()


class _SqliteWatcher(Watcher):
    def __init__(self, store: SqlitePromptStore, callback: Callable[[ChangeEvent], None], reconcile_s: float):
        super().__init__(callback, reconcile_s, name="lpt-store-watch-sqlite")
        self._store = store
        self._conn: sqlite3.Connection | None = None
        self._data_version: int | None = None

    def _wait(self, timeout: float) -> tuple[list[ChangeEvent], bool]:
        if self._conn is None:
            # A private connection: data_version only moves for commits by *other* connections.
            self._conn = sqlite3.connect(self._store.path, isolation_level=None, check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout={self._store._busy_ms}")
            self._data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            return [], True  # commits between the baseline and this connection are only seen by a diff
        deadline = time.monotonic() + timeout
        while True:
            dv = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if dv != self._data_version:
                self._data_version = dv
                return [], True
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.wait(min(_POLL_S, left)):
                return [], False

    def _snapshot(self) -> Snapshot:
        if self._conn is None:
            raise StoreUnavailable("store_unavailable", "watcher connection is not open")
        return _read_snapshot(self._conn)

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(sqlite3.Error):
                conn.close()
