"""``RedisServer`` under its module path for ``bench/loading.py``, which starts a private redis-server with it;
tests import ``tests.support.redis_server``."""

from tests.support.redis_server import RedisServer

__all__ = ["RedisServer"]
