"""Pick a backend from a store spec: a ``redis://``/``rediss://`` URL, or a path for the embedded store."""

from __future__ import annotations

from pathlib import Path

from prompts_store.base import DEFAULT_MAX_BYTES, PromptStore


def open_store(spec: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, timeout_s: float = 0.5) -> PromptStore:
    """Open a store.

    Args:
        spec: ``redis://[user:password@]host:port/db`` or ``rediss://...`` for Redis; anything else is a
            directory (or ``.sqlite``/``.db`` file) for the embedded SQLite store.
        max_bytes: largest prompt set accepted by ``put``.
        timeout_s: Redis socket and connect timeout, so a hung server fails fast.
    """
    text = str(spec)
    if text.startswith(("redis://", "rediss://", "unix://")):
        from prompts_store.redis_store import RedisPromptStore

        return RedisPromptStore(text, max_bytes=max_bytes, timeout_s=timeout_s)
    from prompts_store.sqlite_store import SqlitePromptStore

    path = Path(text).expanduser()
    if path.suffix not in (".sqlite", ".db", ".sqlite3"):
        path = path / "prompts.sqlite"
    return SqlitePromptStore(path, max_bytes=max_bytes)
