"""Per-tenant quotas and per-task retention on both stores (embedded SQLite and a real redis-server), ``lpt store
gc`` on an existing store, and an upload over quota through the real app (403 naming the limit and the use)."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from lpt.errors import QuotaExceeded, StoreUnavailable
from prompts_store import PromptStore, Quotas, TenantUsage, open_store
from prompts_store.cli import main as lpt_main
from prompts_store.redis_store import RedisPromptStore
from service.settings import ServiceConfig
from tests.support.prompt_sets import prompt_bytes
from tests.support.redis_server import RedisServer
from tests.support.service_app import make_config, serve_in_thread

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Backend:
    spec: str
    server: RedisServer | None = None


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request, tmp_path) -> Backend:
    if request.param == "redis":
        return Backend(request.getfixturevalue("redis_server").url, request.getfixturevalue("redis_server"))
    return Backend(str(tmp_path / "store"))


@pytest.fixture
def stores(backend) -> Iterator[Callable[..., PromptStore]]:
    opened: list[PromptStore] = []

    def make(**quotas: int | None) -> PromptStore:
        store = open_store(backend.spec, timeout_s=1.0, quotas=Quotas(**quotas))
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def blob(n: int, seed: int | None = None) -> bytes:
    return os.urandom(n) if seed is None else bytes([seed % 256]) * n


def leftovers(backend: Backend, tenant: str, task: str) -> list[bytes]:
    """Redis keys of a task (its blobs and uploads included); empty on SQLite, where a refused put rolls back."""
    if backend.server is None:
        return []
    with backend.server.client() as c:
        return sorted(c.keys(f"lpt:{{{tenant}/{task}}}:*"))


def test_a_tenant_over_its_task_quota_stores_nothing(backend, stores):
    store = stores(max_tasks_per_tenant=2)
    store.put("acme", "a", blob(10))
    store.put("acme", "b", blob(10))
    before = store.snapshot()
    with pytest.raises(QuotaExceeded) as err:
        store.put("acme", "c", blob(10))
    e = err.value
    assert (e.code, e.field, e.allowed, e.used, e.requested) == ("quota_exceeded", "max_tasks_per_tenant", 2, 2, 1)
    assert "max_tasks_per_tenant" in e.message and "2 tasks" in e.message
    assert e.to_dict() | {"message": ""} == {
        "code": "quota_exceeded", "message": "", "field": "max_tasks_per_tenant", "limit": 2, "used": 2, "requested": 1,
    }  # fmt: skip
    assert store.snapshot() == before and store.list_tasks("acme") == ["a", "b"]
    assert leftovers(backend, "acme", "c") == []
    assert store.usage("acme") == TenantUsage(2, 20)

    assert store.put("acme", "a", blob(10)).version == 2  # a new version of a task it holds is not a new task
    assert store.put("globex", "c", blob(10)).version == 1  # other tenants are not affected
    store.delete("acme", "b")
    assert store.put("acme", "c", blob(10)).version == 1
    assert store.usage("acme") == TenantUsage(2, 30)


def test_a_tenant_over_its_byte_quota_stores_nothing(backend, stores):
    store = stores(max_bytes_per_tenant=1000)
    first, second = blob(600, 1), blob(300, 2)
    store.put("acme", "a", first)
    store.put("acme", "b", second)
    assert store.usage("acme") == TenantUsage(2, 900)
    before = store.snapshot()
    with pytest.raises(QuotaExceeded) as err:
        store.put("acme", "b", blob(101, 3))
    e = err.value
    assert (e.field, e.allowed, e.used, e.requested) == ("max_bytes_per_tenant", 1000, 900, 101)
    assert "900 bytes" in e.message and "1000 bytes" in e.message
    assert store.snapshot() == before and [v.version for v in store.list_versions("acme", "b")] == [1]
    assert [k for k in leftovers(backend, "acme", "b") if b":upload:" in k] == []
    with pytest.raises(QuotaExceeded):
        store.put("acme", "c", blob(200))  # a new task's bytes count the same
    assert store.list_tasks("acme") == ["a", "b"] and leftovers(backend, "acme", "c") == []

    # What adds no bytes is never refused: the active bytes again, a version equal to one the task holds.
    assert not store.put("acme", "a", first).new
    store.put("acme", "b", blob(100, 4))
    assert store.put("acme", "b", second).version == 3 and store.usage("acme") == TenantUsage(2, 1000)
    assert store.put("globex", "a", blob(1000)).version == 1  # another tenant has its own bytes
    store.delete("acme", "a")
    assert store.usage("acme") == TenantUsage(1, 400)
    store.put("acme", "a", blob(600))


def test_retention_keeps_the_active_version_and_the_one_active_before_it(backend, stores):
    store = stores(keep_inactive_versions=1)
    data = {n: blob(100, n) for n in range(1, 8)}
    for n in range(1, 5):
        store.put("acme", "birds", data[n])
    assert [v.version for v in store.list_versions("acme", "birds")] == [3, 4]  # active v4 and v3 before it
    store.activate("acme", "birds", 3)  # a rollback: v3 serves, v4 was bad
    store.put("acme", "birds", data[5])
    assert [v.version for v in store.list_versions("acme", "birds")] == [3, 5]  # v3 was active before v5
    assert store.get("acme", "birds", 3).data == data[3]
    store.put("acme", "birds", data[3])  # the same bytes as a kept version: one blob for both
    assert [v.version for v in store.list_versions("acme", "birds")] == [5, 6]
    assert store.get("acme", "birds", 6).data == data[3] and store.usage("acme") == TenantUsage(1, 200)
    if backend.server is not None:
        assert sum(b":blob:" in k for k in leftovers(backend, "acme", "birds")) == 2  # pruned blobs are gone

    zero = stores(keep_inactive_versions=0)
    zero.put("acme", "birds", data[7])
    assert [v.version for v in zero.list_versions("acme", "birds")] == [6, 7]  # the one before it stays anyway


def test_retention_frees_bytes_in_the_same_upload_that_counts_them(stores):
    store = stores(max_bytes_per_tenant=300, keep_inactive_versions=1)
    for n in range(1, 4):
        store.put("acme", "birds", blob(100, n))
    assert store.usage("acme") == TenantUsage(1, 200)  # v1 was deleted by the upload of v3
    store.put("acme", "cars", blob(100, 9))
    # At the limit, a new version fits because its upload deletes the oldest one.
    assert store.put("acme", "birds", blob(100, 4)).version == 4
    assert store.usage("acme") == TenantUsage(2, 300)
    with pytest.raises(QuotaExceeded):
        store.put("acme", "birds", blob(150, 5))  # frees 100, adds 150


def test_concurrent_uploads_of_one_tenant_never_pass_its_byte_quota(backend, stores):
    writers = [stores(max_bytes_per_tenant=1000) for _ in range(2)]  # like two replicas
    start = threading.Barrier(12)

    def put(i: int) -> bool:
        start.wait()
        try:
            writers[i % 2].put("acme", f"t{i}", blob(200))
            return True
        except QuotaExceeded:
            return False

    with ThreadPoolExecutor(12) as pool:
        accepted = sum(pool.map(put, range(12)))
    assert accepted == 5
    store = stores()
    assert store.usage("acme") == TenantUsage(5, 1000) and len(store.list_tasks("acme")) == 5


def test_gc_applies_retention_to_an_existing_store(backend, stores, capsys):
    store = stores()
    for n in range(1, 6):
        store.put("acme", "birds", blob(100, n))
    store.activate("acme", "birds", 2)
    store.put("acme", "cars", blob(50))
    store.put("globex", "birds", blob(10, 1))
    store.put("globex", "birds", blob(10, 2))
    before = store.snapshot()
    assert lpt_main(["store", "gc", "--store", backend.spec, "--keep-inactive-versions", "1"]) == 0
    out = capsys.readouterr().out
    assert "deleted 3 versions of 1 tasks, 300 bytes freed" in out
    # Active v2 and v5, which was active before it, stay.
    assert [v.version for v in store.list_versions("acme", "birds")] == [2, 5]
    assert [v.version for v in store.list_versions("globex", "birds")] == [1, 2]
    assert store.snapshot() == before  # no task changed state: no revision moved
    assert store.usage("acme") == TenantUsage(2, 250)
    assert lpt_main(["store", "gc", "--store", backend.spec, "--keep-inactive-versions", "1"]) == 0
    assert "deleted 0 versions" in capsys.readouterr().out
    assert lpt_main(["store", "usage", "--store", backend.spec, "--tenant", "acme"]) == 0
    assert capsys.readouterr().out.split() == ["acme", "2", "tasks", "250", "bytes"]


@pytest.mark.redis
def test_gc_recounts_redis_counters_left_too_high(redis_server):
    """A writer that died between its reservation and its commit leaves the counters too high, never too low;
    gc brings them back to what the tasks hold."""
    store = open_store(redis_server.url, quotas=Quotas(max_bytes_per_tenant=500))
    assert isinstance(store, RedisPromptStore)
    store.put("acme", "birds", blob(300))
    with redis_server.client() as c:
        c.hincrby(store.usage_key("acme"), "bytes", 400)  # a reservation whose writer never came back
    with pytest.raises(QuotaExceeded):
        store.put("acme", "cars", blob(100))
    store.gc()
    assert store.usage("acme") == TenantUsage(1, 300)
    store.put("acme", "cars", blob(100))
    store.close()


def test_an_upload_over_quota_answers_403_naming_the_limit_and_the_use(backbone, tmp_path):
    config = make_config(tmp_path, max_tasks_per_tenant=1)
    with serve_in_thread(config, backbone) as s:
        headers = {"Content-Type": "application/octet-stream"}
        data = prompt_bytes(backbone.info, classes=3, seed=1)
        assert s.post("/v1/prompts", params={"task": "a"}, content=data, headers=headers).status_code == 201
        r = s.post("/v1/prompts", params={"task": "b"}, content=data, headers=headers)
        assert r.status_code == 403 and "Retry-After" not in r.headers, r.text
        error = r.json()["error"]
        assert error["code"] == "quota_exceeded" and error["field"] == "max_tasks_per_tenant"
        assert (error["limit"], error["used"], error["requested"]) == (1, 1, 1)
        assert s.get("/v1/prompts/b").status_code == 404


# -- sizing Redis -------------------------------------------------------------------------------------------------
REDIS_OVERHEAD = 1.25  # docs/deploy.md, "Quotas, retention and sizing Redis"
MiB = 1 << 20


def _bytes(size: str) -> int:
    """A Redis memory size (``4gb``, ``512mb``) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([kmg]b)", size.lower()).groups()  # type: ignore[union-attr]
    return int(number) * {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}[unit]


def test_compose_sizes_redis_by_the_documented_rule():
    """Compose's maxmemory holds the two tenants and two replicas it documents, each tenant at its full quota."""
    compose = (ROOT / "docker-compose.yml").read_text()
    default = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", compose))
    assert re.search(r"--maxmemory\n\s+- \$\{REDIS_MAXMEMORY:-", compose) and "noeviction" in compose
    tenants, replicas = 2, 2
    uploads = ServiceConfig().max_concurrent_uploads * ServiceConfig().max_prompt_bytes
    need = REDIS_OVERHEAD * (tenants * int(default["LPT_MAX_BYTES_PER_TENANT"]) + replicas * uploads) + 64 * MiB
    assert need <= _bytes(default["REDIS_MAXMEMORY"]) < 2 * need


@pytest.mark.redis
def test_redis_holds_prompt_sets_within_the_sizing_factor_and_refuses_uploads_when_full(tmp_path):
    with RedisServer(tmp_path / "redis", appendfsync="no") as srv, srv.client() as admin:
        store = open_store(srv.url, max_bytes=8 * MiB, timeout_s=2.0)
        before = admin.info("memory")["used_memory"]
        for i, size in enumerate([300_000] * 10 + [3 * MiB] * 4 + [5 * MiB + 12_345] * 2):
            store.put("acme", f"t{i}", os.urandom(size))
        used = admin.info("memory")["used_memory"] - before
        stored = store.usage("acme").bytes
        assert stored <= used <= REDIS_OVERHEAD * stored, used / stored

        admin.config_set("maxmemory", admin.info("memory")["used_memory"] + 2 * MiB)
        admin.config_set("maxmemory-policy", "noeviction")
        with pytest.raises(StoreUnavailable):  # full: the upload fails (503), nothing is evicted
            store.put("acme", "big", os.urandom(4 * MiB))
        assert store.usage("acme").bytes == stored and store.state("acme", "big").active is None
        assert len(store.get("acme", "t0").data) == 300_000  # reads go on
        store.delete("acme", "t1")  # and deletes, which free room
        store.close()
