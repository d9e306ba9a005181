"""Shared pytest fixtures. Keep this small and general; feature-specific fixtures live next to their tests, and
the helpers every suite shares live in ``tests/support``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lpt.backbone import Backbone, load_backbone
from tests.support.redis_server import RedisServer, running_redis


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    """The suite's one frozen backbone: test_vit at 32 px (depth 6, width 64), random:0 weights; read-only.

    A test that hooks or moves the model builds its own instance instead, so nothing leaks into other tests.
    """
    return load_backbone("test_vit", "random:0", img_size=32)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` for one test (free port, data dir under tmp_path, AOF on); free to kill/pause."""
    with running_redis(tmp_path / "redis") as srv:
        yield srv


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory) -> Iterator[RedisServer]:
    """One ``redis-server`` shared by a whole session: only for tests that neither kill nor pause it, and that
    keep apart by key prefix or database number (or FLUSHDB themselves)."""
    with running_redis(tmp_path_factory.mktemp("redis-session")) as srv:
        yield srv
