"""Pick a backend from a store spec: a Redis URL (one server, Sentinel or Cluster), or a path for the embedded store.

``check_spec`` refuses, before anything connects or is created, a spec that looks like a URL (``something://``)
of a scheme the store does not accept, or a Redis URL that cannot be used, naming the accepted schemes; its
message never shows a password.
"""

from __future__ import annotations

from pathlib import Path

from lpt.prompt_set import MAX_PROMPT_BYTES
from prompts_store.base import PromptStore, Quotas
from prompts_store.redis_urls import REDIS_SCHEMES, accepted_schemes, parse_redis_url, redact_url, scheme_of

SQLITE_SUFFIXES = (".sqlite", ".db", ".sqlite3")


def check_spec(spec: str | Path) -> str:
    """The spec as a string when it can be opened, else ``ValueError`` with one line naming what is accepted.

    Args:
        spec: a Redis URL, or a directory or ``.sqlite``/``.db`` file path.
    """
    text = str(spec)
    scheme = scheme_of(text)
    if scheme is None:
        return text
    if scheme not in REDIS_SCHEMES:
        raise ValueError(
            f"unsupported store {redact_url(text)!r}: accepted schemes are {accepted_schemes()}, "
            "or a directory or .sqlite file path for the embedded store"
        )
    parse_redis_url(text)  # InvalidRedisUrl is a ValueError
    return text


def open_store(
    spec: str | Path, max_bytes: int = MAX_PROMPT_BYTES, timeout_s: float = 0.5, quotas: Quotas | None = None
) -> PromptStore:
    """Open a store.

    Args:
        spec: a Redis URL (``prompts_store.redis_urls``: ``redis://``, ``rediss://``, ``unix://``,
            ``redis+sentinel://``, ``rediss+sentinel://``, ``redis+cluster://``, ``rediss+cluster://``), or a
            directory (or ``.sqlite``/``.db`` file) for the embedded SQLite store; anything else that looks
            like a URL raises ``ValueError`` before anything is created.
        max_bytes: largest prompt set accepted by ``put``.
        timeout_s: Redis socket and connect timeout, so a hung server fails fast.
        quotas: per-tenant limits and retention (none by default).
    """
    text = check_spec(spec)
    if scheme_of(text) is not None:
        from prompts_store.redis_store import RedisPromptStore

        return RedisPromptStore(text, max_bytes=max_bytes, timeout_s=timeout_s, quotas=quotas)
    from prompts_store.sqlite_store import SqlitePromptStore

    path = Path(text).expanduser()
    if path.suffix not in SQLITE_SUFFIXES:
        path = path / "prompts.sqlite"
    return SqlitePromptStore(path, max_bytes=max_bytes, quotas=quotas)
