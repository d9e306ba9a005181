"""Shared pytest fixtures. Keep this small and general; feature-specific fixtures live next to their tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer

_NO_REDIS = "redis-server is not installed (apt-get install redis-server); CI installs it"


def _require_redis() -> None:
    if not RedisServer.available():
        pytest.skip(_NO_REDIS)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` for one test (free port, data dir under tmp_path, AOF on); free to kill/pause."""
    _require_redis()
    srv = RedisServer(data_dir=tmp_path / "redis")
    srv.start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory) -> Iterator[RedisServer]:
    """One ``redis-server`` shared by a whole session: only for tests that neither kill nor pause it, and that
    keep apart by key prefix or database number (or FLUSHDB themselves)."""
    _require_redis()
    srv = RedisServer(data_dir=tmp_path_factory.mktemp("redis-session"))
    srv.start()
    try:
        yield srv
    finally:
        srv.cleanup()
