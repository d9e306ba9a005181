"""Embedded backend: one SQLite file in WAL mode, for a single machine (one or several processes).

Tables::

    tasks(tenant, task, active, previous)              the active pointer and the version active before it (kept
                                                       by retention); a row exists iff the task exists
    versions(tenant, task, version, sha256, size, created, meta)
    blobs(tenant, task, sha256, data)                  content-addressed inside the task
    seqs(tenant, task, last, revision)                 last version issued and the task's revision; written by
                                                       every put and restore, kept on delete (the tombstone),
                                                       so numbers never repeat and revisions never go back

Every write is one ``BEGIN IMMEDIATE`` transaction (writers serialize on SQLite's lock, readers never block),
committed with ``synchronous=FULL``: an acknowledged put survives a process kill and a power loss. Quotas are
checked and retention applied inside the put's transaction, so they are exact. Change notification polls
``PRAGMA data_version`` (cheap, changes when another connection commits) every 0.1 s. Keep the file on a local
disk: WAL needs shared memory, so network filesystems are not supported.

Connections come from a fixed pool (``pool_size``, opened on demand, each used by one thread at a time), so the
number of open handles is bounded however many threads the caller starts and retires.

A file whose ``seqs`` lacks ``revision`` (written before the store had revisions) gets the column on open, in
place, with 0 for every task; each task's next write gives it a clock-based revision. A ``tasks`` table without
``previous`` gets it the same way (NULL: retention then keeps the newest version below the active one).
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

from lpt.errors import NotFound, StoreUnavailable, VersionConflict
from lpt.ids import check_tenant_id
from lpt.prompt_set import MAX_PROMPT_BYTES
from prompts_store._common import (
    Snapshot,
    check_ids,
    check_put,
    check_quotas,
    check_version,
    next_revision,
    plan_put,
    sha256_hex,
    verify_blob,
    versions_to_prune,
)
from prompts_store.base import ChangeEvent, GcReport, Quotas, StoredBlob, StoredVersion, TaskState, TenantUsage
from prompts_store.sqlite_watcher import SqliteWatcher

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    tenant TEXT NOT NULL, task TEXT NOT NULL, active INTEGER NOT NULL, previous INTEGER, PRIMARY KEY (tenant, task)
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
_ADD_PREVIOUS = "ALTER TABLE tasks ADD COLUMN previous INTEGER"
_USAGE = """
SELECT (SELECT COUNT(*) FROM tasks WHERE tenant = ?1),
       (SELECT COALESCE(SUM(size), 0) FROM (SELECT DISTINCT task, sha256, size FROM versions WHERE tenant = ?1))
"""
# Blobs of a task that no version references any more (after retention deleted versions).
_DROP_BLOBS = """
DELETE FROM blobs WHERE tenant = ?1 AND task = ?2
AND sha256 NOT IN (SELECT sha256 FROM versions WHERE tenant = ?1 AND task = ?2)
"""
# Connections per store: reads run in parallel on them (WAL), writes queue on the write lock anyway.
DEFAULT_POOL_SIZE = 4

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


def _row_info(tenant: str, task: str, row: tuple) -> StoredVersion:
    return StoredVersion(
        tenant, task, int(row[0]), row[1], int(row[2]), float(row[3]), json.loads(row[4]), revision=int(row[5])
    )


def _read_snapshot(conn: sqlite3.Connection) -> Snapshot:
    return {(t, k): TaskState(t, k, int(r), a, sha) for t, k, r, a, sha in conn.execute(_SNAPSHOT).fetchall()}


class SqlitePromptStore:
    """Prompt store in one SQLite file. Thread-safe (a fixed pool of connections) and multi-process safe.

    Args:
        path: the database file; its directory is created (mode 0700) if missing.
        max_bytes: largest blob ``put`` accepts.
        busy_timeout_s: how long a writer waits for another writer's lock, and a caller for a free connection,
            before ``StoreUnavailable``.
        quotas: per-tenant limits and retention (none by default).
        pool_size: most connections open at once (the watcher of ``subscribe`` has one more of its own).
    """

    def __init__(
        self,
        path: str | Path,
        max_bytes: int = MAX_PROMPT_BYTES,
        busy_timeout_s: float = 10.0,
        quotas: Quotas | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
    ):
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.quotas = quotas or Quotas()
        self._busy_s = busy_timeout_s
        self._busy_ms = int(busy_timeout_s * 1000)
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._free = threading.BoundedSemaphore(pool_size)
        self._lock = threading.Lock()
        self._opened = 0
        self._write_lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._conn() as conn:
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
                    if "previous" not in {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}:
                        conn.execute(_ADD_PREVIOUS)
        except (sqlite3.Error, OSError) as e:
            raise StoreUnavailable("store_unavailable", f"cannot open sqlite store {self.path}: {e}") from e

    def __repr__(self) -> str:
        return f"SqlitePromptStore({str(self.path)!r})"

    # -- connections --------------------------------------------------------------------------------
    @property
    def open_connections(self) -> int:
        """Connections of the pool open now (idle or in use); at most ``pool_size``."""
        return self._opened

    def _connect(self) -> sqlite3.Connection:
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE for writes), never implicit.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
        conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        """A connection of the pool for the calling thread, until the block ends: an idle one, a new one while
        fewer than ``pool_size`` are open, else the next one returned (waiting up to the busy timeout)."""
        if self._closed:
            raise StoreUnavailable("store_unavailable", "store is closed")
        if not self._free.acquire(timeout=self._busy_s):
            raise StoreUnavailable("store_busy", f"no free sqlite connection within {self._busy_s} s ({self.path})")
        try:
            conn = self._checkout()
        except BaseException:
            self._free.release()
            raise
        try:
            yield conn
        finally:
            self._checkin(conn)
            self._free.release()

    def _checkout(self) -> sqlite3.Connection:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        conn = self._connect()
        with self._lock:
            self._opened += 1
        return conn

    def _checkin(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:  # a read transaction cut short by an error
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        if self._closed:
            self._discard(conn)
        else:
            self._idle.put(conn)

    def _discard(self, conn: sqlite3.Connection) -> None:
        with suppress(sqlite3.Error):
            conn.close()
        with self._lock:
            self._opened -= 1

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
    def _usage(self, conn: sqlite3.Connection, tenant: str) -> TenantUsage:
        tasks, stored = conn.execute(_USAGE, (tenant,)).fetchone()
        return TenantUsage(int(tasks), int(stored))

    @staticmethod
    def _versions(conn: sqlite3.Connection, tenant: str, task: str) -> dict[int, tuple[str, int]]:
        rows = conn.execute("SELECT version, sha256, size FROM versions WHERE tenant = ? AND task = ?", (tenant, task))
        return {int(v): (sha, int(size)) for v, sha, size in rows}

    @staticmethod
    def _delete_versions(conn: sqlite3.Connection, tenant: str, task: str, versions: list[int]) -> None:
        """Delete versions (retention) and then every blob no remaining version of the task references."""
        conn.executemany(
            "DELETE FROM versions WHERE tenant = ? AND task = ? AND version = ?", [(tenant, task, v) for v in versions]
        )
        conn.execute(_DROP_BLOBS, (tenant, task))

    def put(self, tenant: str, task: str, data: bytes, meta: dict[str, str] | None = None) -> StoredVersion:
        """Store ``data`` as a new version and activate it; bytes equal to the active version return it. Quotas are
        checked and retention applied in the same transaction."""
        check_ids(tenant, task)
        meta = check_put(data, meta, self.max_bytes)
        data = bytes(data)
        sha = sha256_hex(data)
        with self._unavailable("put"), self._conn() as conn, self._write(conn):
            row = self._active_row(conn, tenant, task)
            if row is not None and row[1] == sha:
                return _row_info(tenant, task, row)
            last, revision = self._read_seq(conn, tenant, task)
            plan = plan_put(
                self._versions(conn, tenant, task),
                int(row[0]) if row is not None else None,
                last,
                sha,
                len(data),
                self.quotas.keep_inactive_versions,
            )
            if self.quotas.max_tasks_per_tenant is not None or self.quotas.max_bytes_per_tenant is not None:
                usage = self._usage(conn, tenant)
                check_quotas(self.quotas, tenant, usage, int(plan.new_task), plan.added_bytes, plan.freed_bytes)
            info = StoredVersion(
                tenant,
                task,
                plan.version,
                sha,
                len(data),
                time.time(),
                meta,
                new=True,
                revision=next_revision(revision),
            )
            self._write_version(conn, tenant, task, info, data)
            self._write_seq(conn, tenant, task, info.version, info.revision)
            conn.execute(
                "INSERT INTO tasks (tenant, task, active, previous) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO UPDATE SET active = excluded.active, previous = excluded.previous",
                (tenant, task, info.version, row[0] if row is not None else None),
            )
            if plan.pruned:
                self._delete_versions(conn, tenant, task, plan.pruned)
        return info

    def activate(self, tenant: str, task: str, version: int) -> StoredVersion:
        """Make an existing version active at a new revision; the active version itself writes nothing."""
        check_ids(tenant, task)
        check_version(version)
        with self._unavailable("activate"), self._conn() as conn, self._write(conn):
            row = conn.execute(
                f"{_INFO} WHERE v.tenant = ? AND v.task = ? AND v.version = ?", (tenant, task, version)
            ).fetchone()
            if row is None:
                raise NotFound("not_found", f"task {task!r} has no version {version}", "version")
            info = _row_info(tenant, task, row)
            (active,) = conn.execute(
                "SELECT active FROM tasks WHERE tenant = ? AND task = ?", (tenant, task)
            ).fetchone()
            if active == version:
                return info
            last, revision = self._read_seq(conn, tenant, task)
            info = replace(info, revision=next_revision(revision))
            conn.execute(
                "UPDATE tasks SET active = ?, previous = ? WHERE tenant = ? AND task = ?",
                (version, active, tenant, task),
            )
            self._write_seq(conn, tenant, task, last, info.revision)
        return info

    def delete(self, tenant: str, task: str) -> None:
        """Delete a task, all its versions and blobs. Its version numbers are not reused; its revision is bumped
        and kept (the tombstone)."""
        check_ids(tenant, task)
        with self._unavailable("delete"), self._conn() as conn, self._write(conn):
            if conn.execute("DELETE FROM tasks WHERE tenant = ? AND task = ?", (tenant, task)).rowcount == 0:
                raise NotFound("not_found", f"task {task!r} does not exist", "task")
            conn.execute("DELETE FROM versions WHERE tenant = ? AND task = ?", (tenant, task))
            conn.execute("DELETE FROM blobs WHERE tenant = ? AND task = ?", (tenant, task))
            last, revision = self._read_seq(conn, tenant, task)
            self._write_seq(conn, tenant, task, last, next_revision(revision))

    def restore_version(
        self, tenant: str, task: str, version: int, data: bytes, created: float, meta: dict[str, str] | None = None
    ) -> StoredVersion:
        """Write a version with a given number (backup import; quotas and retention do not apply: ``lpt store gc``
        applies retention afterwards). See ``base.SupportsRestore``."""
        check_ids(tenant, task)
        check_version(version)
        meta = check_put(data, meta, self.max_bytes)
        data = bytes(data)
        info = StoredVersion(tenant, task, version, sha256_hex(data), len(data), created, meta)
        with self._unavailable("restore"), self._conn() as conn, self._write(conn):
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
            conn.execute("INSERT OR IGNORE INTO tasks (tenant, task, active) VALUES (?, ?, ?)", (tenant, task, version))
        return info

    # -- maintenance --------------------------------------------------------------------------------
    def usage(self, tenant: str) -> TenantUsage:
        """The tenant's live tasks and stored bytes (each distinct blob of each task once), as quotas count them."""
        check_tenant_id(tenant)
        with self._unavailable("usage"), self._conn() as conn:
            return self._usage(conn, tenant)

    def gc(self, keep_inactive_versions: int | None = None) -> GcReport:
        """Apply retention to every task, one transaction per task. See ``base.SupportsMaintenance``."""
        keep = self.quotas.keep_inactive_versions if keep_inactive_versions is None else keep_inactive_versions
        report = GcReport()
        if keep is None:
            return report
        with self._unavailable("gc"), self._conn() as conn:
            tasks = conn.execute("SELECT tenant, task FROM tasks ORDER BY tenant, task").fetchall()
            for tenant, task in tasks:
                with self._write(conn):
                    report += self._prune(conn, tenant, task, keep)
        return report

    def _prune(self, conn: sqlite3.Connection, tenant: str, task: str, keep: int) -> GcReport:
        row = conn.execute("SELECT active, previous FROM tasks WHERE tenant = ? AND task = ?", (tenant, task))
        pointers = row.fetchone()
        if pointers is None:  # deleted meanwhile
            return GcReport()
        active, previous = pointers
        versions = self._versions(conn, tenant, task)
        if previous is None:  # not recorded (written before retention): the newest version below the active one
            previous = max((v for v in versions if v < active), default=None)
        pruned = versions_to_prune(versions, active, previous, keep)
        if not pruned:
            return GcReport()
        before = self._usage(conn, tenant).bytes
        self._delete_versions(conn, tenant, task, pruned)
        return GcReport(1, len(pruned), before - self._usage(conn, tenant).bytes)

    # -- reads --------------------------------------------------------------------------------------
    def get(self, tenant: str, task: str, version: int | None = None) -> StoredBlob:
        """The active version (or the given one), checksum-verified bytes and metadata."""
        check_ids(tenant, task)
        if version is not None:
            check_version(version)
        # One statement, so pointer, metadata and bytes come from the same consistent snapshot.
        if version is None:
            sql, args = f"{_BLOB}{_JOIN_ACTIVE} WHERE t.tenant = ? AND t.task = ?", (tenant, task)
        else:
            sql, args = f"{_BLOB} WHERE v.tenant = ? AND v.task = ? AND v.version = ?", (tenant, task, version)
        with self._unavailable("get"), self._conn() as conn:
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
        with self._unavailable("active_version"), self._conn() as conn:
            row = self._active_row(conn, tenant, task)
        if row is None:
            raise NotFound("not_found", f"task {task!r} does not exist", "task")
        return _row_info(tenant, task, row)

    def list_tasks(self, tenant: str) -> list[str]:
        check_tenant_id(tenant)
        with self._unavailable("list_tasks"), self._conn() as conn:
            rows = conn.execute("SELECT task FROM tasks WHERE tenant = ? ORDER BY task", (tenant,)).fetchall()
        return [r[0] for r in rows]

    def list_tenants(self) -> list[str]:
        with self._unavailable("list_tenants"), self._conn() as conn:
            rows = conn.execute("SELECT DISTINCT tenant FROM tasks ORDER BY tenant").fetchall()
        return [r[0] for r in rows]

    def list_versions(self, tenant: str, task: str) -> list[StoredVersion]:
        check_ids(tenant, task)
        with self._unavailable("list_versions"), self._conn() as conn:
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
        with self._unavailable("state"), self._conn() as conn:
            revision, active, sha = conn.execute(_STATE, (tenant, task)).fetchone()
        return TaskState(tenant, task, int(revision), active, sha)

    def snapshot(self) -> Snapshot:
        with self._unavailable("snapshot"), self._conn() as conn:
            return _read_snapshot(conn)

    def ping(self) -> None:
        with self._unavailable("ping"), self._conn() as conn:
            conn.execute("SELECT 1 FROM tasks LIMIT 1").fetchall()

    # -- notifications ------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[ChangeEvent], None], reconcile_s: float = 2.0) -> SqliteWatcher:
        """Poll for commits by any connection (this process or another) every 0.1 s and deliver the diff;
        a full snapshot diff also runs every ``reconcile_s``. Never raises for a store error: it retries."""
        watcher = SqliteWatcher(self.path, self._busy_ms, _read_snapshot, callback, reconcile_s)
        watcher.start(self.snapshot)
        return watcher

    def close(self) -> None:
        """Close the idle connections now and each one in use when it is returned."""
        self._closed = True
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            self._discard(conn)
