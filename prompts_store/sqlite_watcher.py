"""The embedded (SQLite) backend's change watcher: a private connection polls ``PRAGMA data_version`` and a
snapshot diff turns each commit into changes (``prompts_store._common.Watcher`` owns the loop)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from lpt.errors import StoreUnavailable
from prompts_store._common import Snapshot, Watcher
from prompts_store.base import ChangeEvent

_POLL_S = 0.1


class SqliteWatcher(Watcher):
    """Delivers the store's changes by polling ``PRAGMA data_version`` on a private connection every 0.1 s (it moves
    on every commit by another connection, in this process or another) and diffing snapshots when it does.

    Args:
        path: the database file.
        busy_ms: SQLite's busy timeout for the watcher's connection.
        read_snapshot: the store's snapshot of every task's state, read on a connection.
        callback: receives each change.
        reconcile_s: seconds between full snapshot diffs even without a commit.
    """

    def __init__(
        self,
        path: Path,
        busy_ms: int,
        read_snapshot: Callable[[sqlite3.Connection], Snapshot],
        callback: Callable[[ChangeEvent], None],
        reconcile_s: float,
    ):
        super().__init__(callback, reconcile_s, name="lpt-store-watch-sqlite")
        self._path, self._busy_ms, self._read_snapshot = path, busy_ms, read_snapshot
        self._conn: sqlite3.Connection | None = None
        self._data_version: int | None = None

    def _wait(self, timeout: float) -> tuple[list[ChangeEvent], bool]:
        if self._conn is None:
            # A private connection: data_version only moves for commits by *other* connections.
            self._conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
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
        return self._read_snapshot(self._conn)

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(sqlite3.Error):
                conn.close()
