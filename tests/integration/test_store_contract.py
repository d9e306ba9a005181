"""One contract for every prompt store backend: embedded SQLite and a real redis-server (never a mock).

Redis-only parts (faults of the server process, pub/sub reconnect, URL auth) are marked in their names.
Blobs are random bytes: the store does not validate the format, the service does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from lpt.errors import InvalidId, InvalidVersion, NotFound, StoreUnavailable, TooLarge
from prompts_store import ChangeEvent, PromptStore, TaskState, TenantUsage, open_store
from prompts_store.base import GcReport
from prompts_store.cli import main as lpt_main
from prompts_store.redis_store import RedisPromptStore
from prompts_store.sqlite_store import DEFAULT_POOL_SIZE, SqlitePromptStore
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 0.25  # the Redis socket/connect timeout under test; StoreUnavailable must come within it
SLACK_S = 0.35  # scheduling noise on a busy 2-core CI machine


@dataclass
class Backend:
    name: str
    spec: str
    server: RedisServer | None = None

    def open(self, max_bytes: int = 1 << 20) -> PromptStore:
        return open_store(self.spec, max_bytes=max_bytes, timeout_s=TIMEOUT_S)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path) -> Backend:
    if request.param == "redis":
        srv: RedisServer = request.getfixturevalue("redis_server")
        return Backend("redis", srv.url, srv)
    return Backend("sqlite", str(tmp_path / "store"))


@pytest.fixture
def stores(backend) -> Iterator[Callable[..., PromptStore]]:
    """Opens store objects (each its own client, like separate replicas) and closes them after the test."""
    opened: list[PromptStore] = []

    def make(**kw) -> PromptStore:
        s = backend.open(**kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(stores) -> PromptStore:
    return stores()


def blob(n: int = 256) -> bytes:
    return os.urandom(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def live(snapshot: dict[tuple[str, str], TaskState]) -> dict[tuple[str, str], int]:
    """The active version of every task a snapshot holds, tombstones left out."""
    return {key: s.active for key, s in snapshot.items() if s.active is not None}


class Events:
    """Collects change events from a subscription callback and waits for a given one."""

    def __init__(self) -> None:
        self.items: list[tuple[float, ChangeEvent]] = []
        self._cv = threading.Condition()

    def __call__(self, ev: ChangeEvent) -> None:
        with self._cv:
            self.items.append((time.monotonic(), ev))
            self._cv.notify_all()

    def wait_for(self, want: ChangeEvent, timeout: float) -> float:
        """Seconds (monotonic clock) at which ``want`` arrived; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for t, ev in self.items:
                    if ev == want:
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{want} not delivered within {timeout}s; got {[e for _, e in self.items]}")
                self._cv.wait(left)


# -- basic contract ----------------------------------------------------------------------------------


def test_put_get_list_versions_rollback_delete(store):
    a, b = blob(), blob()
    v1 = store.put("acme", "birds", a, {"num_classes": "10"})
    assert (v1.tenant, v1.task, v1.version, v1.size) == ("acme", "birds", 1, len(a))
    assert v1.sha256 == hashlib.sha256(a).hexdigest() and v1.meta == {"num_classes": "10"}
    assert abs(v1.created - time.time()) < 60
    v2 = store.put("acme", "birds", b)
    assert v2.version == 2 and v2.meta == {}
    got = store.get("acme", "birds")
    assert got.data == b and got.info == v2 and store.active_version("acme", "birds") == v2
    assert store.get("acme", "birds", 1).data == a and store.get("acme", "birds", 1).info == v1
    assert store.list_versions("acme", "birds") == [v1, v2]
    assert store.list_tasks("acme") == ["birds"] and store.list_tenants() == ["acme"]
    assert live(store.snapshot()) == {("acme", "birds"): 2}

    assert store.activate("acme", "birds", 1) == v1  # rollback
    assert store.get("acme", "birds").data == a and live(store.snapshot()) == {("acme", "birds"): 1}
    assert store.put("acme", "birds", b).version == 3  # equal to a non-active version: a new version
    with pytest.raises(NotFound):
        store.activate("acme", "birds", 9)
    with pytest.raises(NotFound):
        store.get("acme", "birds", 9)

    store.put("acme", "cars", blob())
    store.delete("acme", "birds")
    assert store.list_tasks("acme") == ["cars"] and live(store.snapshot()) == {("acme", "cars"): 1}
    for call in (
        lambda: store.get("acme", "birds"),
        lambda: store.get("acme", "birds", 1),
        lambda: store.active_version("acme", "birds"),
        lambda: store.list_versions("acme", "birds"),
        lambda: store.delete("acme", "birds"),
    ):
        with pytest.raises(NotFound):
            call()
    # Numbers are never reused, so a replica that missed the delete still sees a change on reconcile.
    assert store.put("acme", "birds", a).version == 4
    store.delete("acme", "birds")
    store.delete("acme", "cars")
    assert store.list_tenants() == [] and live(store.snapshot()) == {}


def test_reupload_equal_to_active_is_idempotent(store):
    a = blob()
    v1 = store.put("acme", "birds", a, {"k": "1"})
    assert v1.new
    again = store.put("acme", "birds", a, {"k": "other"})
    assert again == v1 and not again.new  # the hit says so: nothing was written
    assert store.put("acme", "birds", bytearray(a)) == v1
    assert [v.version for v in store.list_versions("acme", "birds")] == [1]
    assert not store.active_version("acme", "birds").new  # reads never claim a write
    v2 = store.put("acme", "birds", blob())
    assert v2.new and store.put("acme", "birds", a).new  # equal to an older, inactive version: a new version


def test_large_and_empty_blobs_round_trip(backend, stores):
    store = stores(max_bytes=4 << 20)
    big = blob((3 << 20) + 17)  # several Redis upload chunks
    assert store.put("acme", "big", big).size == len(big)
    assert store.get("acme", "big").data == big
    assert store.put("acme", "empty", b"").size == 0 and store.get("acme", "empty").data == b""
    if backend.server is not None:
        with backend.server.client() as c:
            assert c.keys("lpt:{*}:upload:*") == []  # temporary upload keys were renamed into place


def test_concurrent_puts_are_never_lost_or_torn(stores):
    writer_store, reader_store = stores(), stores()
    payloads = [blob(random.randint(500, 4000)) for _ in range(45)]
    payloads += payloads[:5]  # identical bytes racing: new versions or idempotent hits, never anything else
    start = threading.Barrier(len(payloads))
    done = threading.Event()
    seen: list[tuple[int, str]] = []
    problems: list[str] = []

    def put(data: bytes):
        start.wait()
        return writer_store.put("acme", "hot", data), data

    def read() -> None:
        while not done.is_set():
            try:
                got = reader_store.get("acme", "hot")
                old = reader_store.get("acme", "hot", random.randint(1, got.info.version))
            except NotFound:
                continue  # before the first put commits
            for g in (got, old):
                if hashlib.sha256(g.data).hexdigest() != g.info.sha256 or len(g.data) != g.info.size:
                    problems.append(f"torn read of v{g.info.version}")
                seen.append((g.info.version, g.info.sha256))

    readers = [threading.Thread(target=read) for _ in range(3)]
    for r in readers:
        r.start()
    try:
        with ThreadPoolExecutor(len(payloads)) as pool:
            results = list(pool.map(put, payloads))
    finally:
        done.set()
        for r in readers:
            r.join()

    assert not problems
    versions = {v.version: v for v in reader_store.list_versions("acme", "hot")}
    for info, data in results:
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert versions[info.version].sha256 == info.sha256  # acknowledged, present, same bytes
        assert reader_store.get("acme", "hot", info.version).data == data
    assert sorted(versions) == list(range(1, len(versions) + 1))  # no holes, no torn or phantom versions
    assert len({i.version for i, _ in results}) == len(versions) >= 45
    assert all(versions[v].sha256 == sha for v, sha in seen)
    assert seen, "readers never observed a version"


def test_tenants_are_isolated(store):
    store.put("acme", "birds", blob())
    theirs = blob()
    store.put("globex", "birds", theirs)
    store.put("globex", "cars", blob())
    assert store.list_tasks("acme") == ["birds"] and store.list_tasks("initech") == []
    assert store.get("globex", "birds").data == theirs
    store.delete("acme", "birds")
    assert store.get("globex", "birds").data == theirs
    assert store.list_tasks("globex") == ["birds", "cars"] and store.list_tenants() == ["globex"]
    with pytest.raises(NotFound):
        store.get("acme", "cars")  # exists for another tenant: same answer as missing


BAD_IDS = ["", "Birds", "../etc", "a/b", "a:b", "a b", "-lead", ".hidden", "x" * 65, "caf\u00e9", "a\nb", "*"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_ids_are_rejected_before_any_write(store, bad):
    store.put("acme", "ok", blob())
    calls = [
        lambda: store.put("acme", bad, blob()),
        lambda: store.put(bad, "ok", blob()),
        lambda: store.get("acme", bad),
        lambda: store.get(bad, "ok"),
        lambda: store.active_version("acme", bad),
        lambda: store.list_versions("acme", bad),
        lambda: store.list_tasks(bad),
        lambda: store.activate("acme", bad, 1),
        lambda: store.delete(bad, "ok"),
        lambda: store.state("acme", bad),
        lambda: store.state(bad, "ok"),
    ]
    for call in calls:
        with pytest.raises(InvalidId):
            call()
    for version in (0, -1, True):
        with pytest.raises(InvalidVersion):
            store.get("acme", "ok", version)
    assert live(store.snapshot()) == {("acme", "ok"): 1} and store.list_tenants() == ["acme"]


def test_size_limit_is_checked_before_anything_is_written(backend, stores):
    small = stores(max_bytes=1000)
    assert small.put("acme", "a", blob(1000)).version == 1  # the limit itself is allowed
    with pytest.raises(TooLarge):
        small.put("acme", "a", blob(1001))
    with pytest.raises(TooLarge):
        small.put("acme", "fresh", blob(5000))
    with pytest.raises(TooLarge):
        small.put("acme", "a", blob(10), {"k": "v" * 20_000})
    assert live(small.snapshot()) == {("acme", "a"): 1} and small.list_tasks("acme") == ["a"]
    if backend.server is not None:
        with backend.server.client() as c:  # not even a blob was uploaded
            assert len(c.keys("lpt:{*}:blob:*")) == 1 and c.keys("lpt:{*}:upload:*") == []


# -- revisions ---------------------------------------------------------------------------------------


def test_every_change_gets_a_higher_revision_and_reads_report_it(store):
    assert store.state("acme", "birds") == TaskState("acme", "birds", 0, None, None)  # never seen
    a, b = blob(), blob()
    v1 = store.put("acme", "birds", a)
    assert v1.revision > 0 and store.state("acme", "birds") == TaskState("acme", "birds", v1.revision, 1, sha(a))
    again = store.put("acme", "birds", a)  # idempotent: nothing written, the same revision
    assert not again.new and again.revision == v1.revision
    v2 = store.put("acme", "birds", b)
    assert v2.revision > v1.revision
    rolled_back = store.activate("acme", "birds", 1)
    assert rolled_back.revision > v2.revision
    assert store.activate("acme", "birds", 1).revision == rolled_back.revision  # already active: nothing written
    current = store.state("acme", "birds")
    assert current == TaskState("acme", "birds", rolled_back.revision, 1, sha(a))

    # Every read names the revision it was made at, the bytes' one read with the active pointer.
    got = store.get("acme", "birds")
    assert (got.data, got.info.version, got.info.revision) == (a, 1, current.revision)
    assert store.get("acme", "birds", 2).info.revision == current.revision
    assert store.active_version("acme", "birds").revision == current.revision
    assert {v.revision for v in store.list_versions("acme", "birds")} == {current.revision}

    restored = store.restore_version("acme", "birds", 7, blob(), 1.0)  # import of a version: a write
    assert restored.revision > current.revision
    assert store.state("acme", "birds") == TaskState("acme", "birds", restored.revision, 1, sha(a))  # same pointer

    store.delete("acme", "birds")
    tombstone = store.state("acme", "birds")
    assert tombstone.revision > restored.revision and (tombstone.active, tombstone.sha256) == (None, None)
    assert store.snapshot() == {("acme", "birds"): tombstone}  # the snapshot carries the delete
    with pytest.raises(NotFound):
        store.get("acme", "birds")
    assert store.list_tasks("acme") == [] and store.list_tenants() == []

    c = blob()
    recreated = store.put("acme", "birds", c)
    assert recreated.version == 8 and recreated.revision > tombstone.revision
    assert store.snapshot() == {("acme", "birds"): TaskState("acme", "birds", recreated.revision, 8, sha(c))}


def test_restore_into_a_new_task_creates_it_at_a_revision(store):
    data = blob()
    info = store.restore_version("acme", "birds", 3, data, 1.0, {"k": "v"})
    assert info.revision > 0 and info.version == 3 and info.created == 1.0
    assert store.state("acme", "birds") == TaskState("acme", "birds", info.revision, 3, sha(data))
    assert store.restore_version("acme", "birds", 3, data, 1.0).revision == info.revision  # present: a no-op


def test_revisions_are_per_task_and_snapshot_holds_every_task(store):
    birds, cars = store.put("acme", "birds", blob()), store.put("globex", "cars", blob())
    store.put("acme", "birds", blob())
    assert store.state("globex", "cars").revision == cars.revision  # another task's write leaves it alone
    store.delete("globex", "cars")
    snap = store.snapshot()
    assert set(snap) == {("acme", "birds"), ("globex", "cars")}
    assert snap[("acme", "birds")] == store.state("acme", "birds") and snap[("acme", "birds")].revision > birds.revision
    assert snap[("globex", "cars")] == store.state("globex", "cars") and snap[("globex", "cars")].active is None


def _wipe(backend: Backend, store: PromptStore) -> None:
    """Lose everything, tombstones included: a new Redis after a failover without a replica, a new disk."""
    if backend.server is not None:
        with backend.server.client() as c:
            c.flushall()
    else:
        store.close()
        shutil.rmtree(backend.spec)


def test_import_of_an_older_export_into_a_wiped_store_gives_higher_revisions(backend, stores, tmp_path, capsys):
    store = stores()
    store.put("acme", "birds", blob())
    store.put("acme", "cars", blob())
    archive = tmp_path / "old.tar"
    assert lpt_main(["store", "export", "--store", backend.spec, "--out", str(archive)]) == 0
    # Writes after the export, which the archive does not hold.
    store.put("acme", "birds", blob())
    store.delete("acme", "cars")
    store.put("acme", "new", blob())
    seen = max(s.revision for s in store.snapshot().values())

    _wipe(backend, store)
    store = stores()
    assert store.snapshot() == {} and store.state("acme", "cars").revision == 0
    assert lpt_main(["store", "import", "--store", backend.spec, str(archive)]) == 0
    capsys.readouterr()
    after = store.snapshot()
    assert live(after) == {("acme", "birds"): 1, ("acme", "cars"): 1}
    # A replica still serving birds v2 or the deleted cars sees newer states, and follows them.
    assert min(s.revision for s in after.values()) > seen


_LEGACY_SQLITE_SCHEMA = """
CREATE TABLE tasks (tenant TEXT NOT NULL, task TEXT NOT NULL, active INTEGER NOT NULL, PRIMARY KEY (tenant, task))
    WITHOUT ROWID;
CREATE TABLE versions (tenant TEXT NOT NULL, task TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, created REAL NOT NULL, meta TEXT NOT NULL, PRIMARY KEY (tenant, task, version))
    WITHOUT ROWID;
CREATE TABLE blobs (tenant TEXT NOT NULL, task TEXT NOT NULL, sha256 TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (tenant, task, sha256));
CREATE TABLE seqs (tenant TEXT NOT NULL, task TEXT NOT NULL, last INTEGER NOT NULL, PRIMARY KEY (tenant, task))
    WITHOUT ROWID;
"""


def _write_store_without_revisions(backend: Backend, versions: list[bytes], active: int) -> None:
    """acme/birds with ``versions`` and acme/gone (deleted at v4) in the layout written before revisions."""
    records = [(n, sha(d), len(d), 1000.0 + n, json.dumps({})) for n, d in enumerate(versions, 1)]
    if backend.server is not None:
        with backend.server.client() as c, c.pipeline(transaction=True) as p:
            for n, digest, size, created, _ in records:
                info = {"sha256": digest, "size": size, "created": created, "meta": {}}
                p.hset("lpt:task:acme:birds", f"v:{n}", json.dumps(info, sort_keys=True))
                p.set(f"lpt:blob:acme:birds:{digest}", versions[n - 1])
                p.sadd("lpt:blobs:acme:birds", digest)
            p.hset("lpt:task:acme:birds", "active", active)
            p.set("lpt:seq:acme:birds", len(versions))
            p.set("lpt:seq:acme:gone", 4)
            p.sadd("lpt:tasks:acme", "birds")
            p.sadd("lpt:tenants", "acme")
            p.hset("lpt:active", "acme/birds", active)  # a bare version number
            p.execute()
        return
    path = Path(backend.spec) / "prompts.sqlite"
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as c:
        c.executescript(_LEGACY_SQLITE_SCHEMA)
        c.executemany("INSERT INTO versions VALUES ('acme', 'birds', ?, ?, ?, ?, ?)", records)
        c.executemany("INSERT OR IGNORE INTO blobs VALUES ('acme', 'birds', ?, ?)", [(sha(d), d) for d in versions])
        c.execute("INSERT INTO tasks VALUES ('acme', 'birds', ?)", (active,))
        c.executemany("INSERT INTO seqs VALUES ('acme', ?, ?)", [("birds", len(versions)), ("gone", 4)])
    c.close()


def test_store_written_before_revisions_reads_as_revision_0_until_its_next_write(backend, stores):
    a, b = blob(), blob()
    _write_store_without_revisions(backend, [a, b], active=1)
    store = stores()
    old = TaskState("acme", "birds", 0, 1, sha(a))
    assert store.state("acme", "birds") == old and store.snapshot() == {("acme", "birds"): old}
    assert store.state("acme", "gone") == TaskState("acme", "gone", 0, None, None)
    got = store.get("acme", "birds")
    assert (got.data, got.info.revision) == (a, 0) and store.get("acme", "birds", 2).data == b
    assert [v.version for v in store.list_versions("acme", "birds")] == [1, 2]
    assert store.put("acme", "birds", a).revision == 0  # idempotent: still nothing written

    reopened = stores()  # opening again (the SQLite migration is idempotent) changes nothing
    assert reopened.state("acme", "birds") == old
    v3 = reopened.put("acme", "birds", blob())
    assert v3.version == 3 and v3.revision > 0 and store.state("acme", "birds").revision == v3.revision
    gone = reopened.put("acme", "gone", blob())
    assert gone.version == 5 and gone.revision > 0  # numbering continues after the old delete


def _write_layout_before_hash_tags(c, versions: list[bytes], active: int, revision: int, gone: int) -> None:
    """acme/birds (``versions``, ``active`` at ``revision``, plus an unreferenced blob) and acme/gone (a tombstone
    at revision ``gone``) in the Redis layout written before hash tags, with revisions."""
    with c.pipeline(transaction=True) as p:
        for n, data in enumerate(versions, 1):
            info = {"sha256": sha(data), "size": len(data), "created": 1000.0 + n, "meta": {"n": str(n)}}
            p.hset("lpt:task:acme:birds", f"v:{n}", json.dumps(info, sort_keys=True))
            p.set(f"lpt:blob:acme:birds:{sha(data)}", data)
            p.sadd("lpt:blobs:acme:birds", sha(data))
        p.set(f"lpt:blob:acme:birds:{'0' * 64}", b"left by a crashed writer")
        p.sadd("lpt:blobs:acme:birds", "0" * 64)
        p.hset("lpt:task:acme:birds", "active", active)
        p.set("lpt:seq:acme:birds", len(versions))
        p.set("lpt:seq:acme:gone", 3)
        p.sadd("lpt:tasks:acme", "birds")
        p.sadd("lpt:tenants", "acme")
        live = {"revision": revision, "active": active, "sha256": sha(versions[active - 1])}
        tombstone = {"revision": gone, "active": None, "sha256": None}
        p.hset("lpt:active", mapping={"acme/birds": json.dumps(live), "acme/gone": json.dumps(tombstone)})
        p.execute()


def test_redis_layout_before_hash_tags_moves_in_place_once_keeping_revisions_and_tombstones(redis_server):
    data = [blob(), blob(), blob()]
    with redis_server.client() as c:
        _write_layout_before_hash_tags(c, data, active=2, revision=5_000, gone=7_000)
    opened = [open_store(redis_server.url, timeout_s=1.0) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:  # replicas starting together move each task once
        snapshots = list(pool.map(lambda store: store.snapshot(), opened))
    want = {
        ("acme", "birds"): TaskState("acme", "birds", 5_000, 2, sha(data[1])),
        ("acme", "gone"): TaskState("acme", "gone", 7_000, None, None),
    }
    assert snapshots == [want] * 3
    store = opened[0]
    assert [(v.version, v.meta) for v in store.list_versions("acme", "birds")] == [
        (n, {"n": str(n)}) for n in (1, 2, 3)
    ]
    assert [store.get("acme", "birds", n).data for n in (1, 2, 3)] == data
    assert store.usage("acme") == TenantUsage(1, sum(map(len, data)))
    with redis_server.client() as c:
        assert sorted(k.decode() for k in c.keys("*") if not k.startswith(b"lpt:{")) == ["lpt:layout", "lpt:tenants"]
        blobs = {k.decode().rsplit(":", 1)[1] for k in c.keys("lpt:{acme/birds}:blob:*")}
        assert blobs == {sha(d) for d in data}  # renamed into place; the unreferenced one is gone
    # Which version was active before v2 was not recorded: retention keeps the newest one below it instead.
    assert store.gc(0) == GcReport(1, 1, len(data[2]))
    assert [v.version for v in store.list_versions("acme", "birds")] == [1, 2]
    v4 = store.put("acme", "birds", blob())
    assert (v4.version, store.put("acme", "gone", blob()).version) == (4, 4)  # numbering goes on after both
    assert v4.revision > 5_000 and store.state("acme", "gone").revision > 7_000
    for s in opened:
        s.close()


# -- notifications -----------------------------------------------------------------------------------


def test_second_client_is_notified_within_1s(stores):
    writer, watcher = stores(), stores()
    events = Events()
    sub = watcher.subscribe(events, reconcile_s=30)  # only push (Redis) or polling (SQLite) can be this fast
    try:
        for change in [
            lambda: writer.put("acme", "birds", blob()),
            lambda: writer.put("acme", "birds", blob()),
            lambda: writer.activate("acme", "birds", 1),
            lambda: writer.delete("acme", "birds"),
        ]:
            change()
            t0 = time.monotonic()
            want = writer.state("acme", "birds")  # the event is the state: revision, version and sha256
            assert events.wait_for(want, 1.0) - t0 < 1.0
        assert want.active is None and want.sha256 is None  # the delete arrives as its tombstone
    finally:
        sub.close()
    revisions = [ev.revision for _, ev in events.items]
    assert revisions == sorted(set(revisions)) and len(revisions) == 4  # each state once, in order


_SUBSCRIBER = """
import dataclasses, json, sys
from prompts_store import open_store
store = open_store(sys.argv[1], timeout_s=0.25)
sub = store.subscribe(lambda e: print(json.dumps(dataclasses.asdict(e)), flush=True), reconcile_s=30)
print("ready", flush=True)
sys.stdin.read()
sub.close()
"""


def test_second_process_is_notified_within_1s(backend, store):
    proc = subprocess.Popen(
        [sys.executable, "-c", _SUBSCRIBER, backend.spec],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for n in (1, 2):
            v = store.put("acme", "birds", blob())
            t0 = time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            assert ready, "no notification in the other process within 1 s"
            got = json.loads(proc.stdout.readline())
            assert got == asdict(TaskState("acme", "birds", v.revision, n, v.sha256))
            assert time.monotonic() - t0 < 1.0
    finally:
        proc.kill()
        proc.wait()


def _set_state_silently(
    backend: Backend, store: PromptStore, tenant: str, task: str, version: int, revision: int
) -> TaskState:
    """Set the task's state in the store's own layout without any notification: what a replica sees when it
    missed the message (or what a store holds after it lost the writes that followed ``revision``)."""
    state = TaskState(tenant, task, revision, version, store.get(tenant, task, version).info.sha256)
    if isinstance(store, RedisPromptStore):
        with backend.server.client() as c:  # type: ignore[union-attr]
            key = store.task_key(tenant, task)
            old = json.loads(c.hget(key, "state"))
            c.hset(key, "state", json.dumps(old | {"revision": revision, "active": version, "sha256": state.sha256}))
    else:
        with sqlite3.connect(Path(backend.spec) / "prompts.sqlite") as c:
            c.execute("UPDATE tasks SET active = ? WHERE tenant = ? AND task = ?", (version, tenant, task))
            c.execute("UPDATE seqs SET revision = ? WHERE tenant = ? AND task = ?", (revision, tenant, task))
    return state


def test_missed_notification_is_recovered_by_reconciliation(backend, stores):
    writer, watcher = stores(), stores()
    writer.put("acme", "birds", blob())
    v2 = writer.put("acme", "birds", blob())
    events = Events()
    sub = watcher.subscribe(events, reconcile_s=0.5)
    try:
        want = _set_state_silently(backend, writer, "acme", "birds", 1, v2.revision + 1)
        t0 = time.monotonic()
        assert events.wait_for(want, 2.0) - t0 < 1.5
    finally:
        sub.close()


def test_lost_writes_are_reported_and_the_next_write_is_newer(backend, stores):
    """A store that lost its last write (Redis failover, restored backup) holds an older state than a replica
    saw: reconciliation reports what the store holds, and the next write's revision is above everything."""
    writer, watcher = stores(), stores()
    v1 = writer.put("acme", "birds", blob())
    v2 = writer.put("acme", "birds", blob())
    events = Events()
    sub = watcher.subscribe(events, reconcile_s=0.3)
    try:
        lost = _set_state_silently(backend, writer, "acme", "birds", 1, v1.revision)  # v2's write is lost
        events.wait_for(lost, 2.0)  # lower than the revision known, and delivered: it is what the store holds
        v3 = writer.put("acme", "birds", blob())
        assert v3.revision > v2.revision
        events.wait_for(TaskState("acme", "birds", v3.revision, v3.version, v3.sha256), 2.0)
    finally:
        sub.close()


def test_redis_pubsub_connection_dropped_then_changes_recovered(redis_server):
    writer, watcher = (open_store(redis_server.url, timeout_s=TIMEOUT_S) for _ in range(2))
    events = Events()
    sub = watcher.subscribe(events, reconcile_s=30)
    try:
        time.sleep(0.2)
        with redis_server.client() as c:
            c.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        v = writer.put("acme", "birds", blob())  # published while the watcher had no subscription
        events.wait_for(ChangeEvent("acme", "birds", v.revision, 1, v.sha256), 2.5)
    finally:
        sub.close()
        writer.close()
        watcher.close()


def test_redis_down_at_subscribe_is_no_error_and_the_store_arrives_in_full_once_back(redis_server):
    """A watcher started while Redis is down knows nothing of the store: the first snapshot it reads once Redis is
    back is delivered whole, including a task that has not changed since."""
    writer, watcher = (open_store(redis_server.url, timeout_s=TIMEOUT_S) for _ in range(2))
    v = writer.put("acme", "birds", blob())
    redis_server.stop()
    events = Events()
    sub = watcher.subscribe(events, reconcile_s=0.3)
    try:
        redis_server.restart()
        events.wait_for(ChangeEvent("acme", "birds", v.revision, 1, v.sha256), 5.0)
    finally:
        sub.close()
        writer.close()
        watcher.close()


def _publish(redis_server: RedisServer, message: dict) -> None:
    with redis_server.client() as c:
        c.publish("lpt:changes", json.dumps(message))


def _wait_subscribed(redis_server: RedisServer, timeout: float = 5.0) -> None:
    """Until a watcher listens on the change channel, so a message published next reaches it."""
    deadline = time.monotonic() + timeout
    with redis_server.client() as c:
        while c.pubsub_numsub("lpt:changes")[0][1] < 1:
            assert time.monotonic() < deadline, "the watcher never subscribed"
            time.sleep(0.02)


def test_redis_pushed_state_is_delivered_only_when_newer_than_the_known_one(redis_server):
    writer, watcher = (open_store(redis_server.url, timeout_s=TIMEOUT_S) for _ in range(2))
    v1 = writer.put("acme", "birds", blob())
    writer.put("acme", "birds", blob())
    events = Events()
    sub = watcher.subscribe(events, reconcile_s=30)  # no reconcile during the test: only pushes deliver
    try:
        _wait_subscribed(redis_server)
        _publish(redis_server, asdict(TaskState("acme", "birds", v1.revision, 1, v1.sha256)))  # late, stale
        rolled_back = writer.activate("acme", "birds", 1)
        want = TaskState("acme", "birds", rolled_back.revision, 1, v1.sha256)
        events.wait_for(want, 1.0)
        _publish(redis_server, asdict(want))  # a repeat of the known state
        writer.put("acme", "cars", blob())
        events.wait_for(writer.state("acme", "cars"), 1.0)  # messages arrive in order: the repeat came before
        assert [ev for _, ev in events.items] == [want, writer.state("acme", "cars")]
    finally:
        sub.close()
        writer.close()
        watcher.close()


def test_redis_message_without_a_revision_makes_the_watcher_read_a_snapshot(redis_server):
    """A writer from before revisions publishes {tenant, task, active}: the watcher cannot trust it as a state,
    so it diffs a snapshot at once instead of waiting for the next reconciliation."""
    writer, watcher = (open_store(redis_server.url, timeout_s=TIMEOUT_S) for _ in range(2))
    writer.put("acme", "birds", blob())
    v2 = writer.put("acme", "birds", blob())
    events = Events()
    sub = watcher.subscribe(events, reconcile_s=30)
    try:
        _wait_subscribed(redis_server)
        backend = Backend("redis", redis_server.url, redis_server)
        want = _set_state_silently(backend, writer, "acme", "birds", 1, v2.revision + 1)
        _publish(redis_server, {"tenant": "acme", "task": "birds", "active": 1})
        events.wait_for(want, 1.0)
    finally:
        sub.close()
        writer.close()
        watcher.close()


def test_subscription_survives_a_failing_callback_and_closes_promptly(stores):
    writer, watcher = stores(), stores()
    events = Events()
    calls = []

    def callback(ev: ChangeEvent) -> None:
        calls.append(ev)
        if len(calls) == 1:
            raise RuntimeError("bug in the service's callback")
        events(ev)

    sub = watcher.subscribe(callback, reconcile_s=0.3)
    writer.put("acme", "a", blob())
    time.sleep(0.5)
    writer.put("acme", "b", blob())
    events.wait_for(writer.state("acme", "b"), 2.0)
    t0 = time.monotonic()
    sub.close()
    assert time.monotonic() - t0 < 1.0 and not sub.alive


# -- durability and faults ---------------------------------------------------------------------------


def test_redis_kill_9_loses_no_acknowledged_version(redis_server):
    srv, store = redis_server, open_store(redis_server.url, timeout_s=TIMEOUT_S)
    acked: list[tuple[str, int, str]] = []
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            task = f"t{i % 4}"
            try:
                v = store.put("acme", task, blob(random.randint(100, 3000)))
            except StoreUnavailable:
                continue
            acked.append((task, v.version, v.sha256))
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.3)
    srv.kill()  # mid-stream: some put was surely in flight
    time.sleep(0.1)
    stop.set()
    writer.join()
    assert len(acked) > 10
    srv.restart()
    for task, version, sha in acked:
        got = store.get("acme", task, version)  # the store object reconnects by itself
        assert got.info.sha256 == sha == hashlib.sha256(got.data).hexdigest()
    assert store.put("acme", "t0", blob()).version > max(v for t, v, _ in acked if t == "t0")
    store.close()


_WRITER = """
import os, sys
from prompts_store import open_store
store = open_store(sys.argv[1])
while True:
    v = store.put("acme", "birds", os.urandom(1000))
    print(v.version, v.sha256, flush=True)
"""


def test_sqlite_writer_kill_9_loses_no_acknowledged_version(tmp_path):
    spec = str(tmp_path / "store")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, spec], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    acked = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acked.append(line.split())
        if len(acked) == 20:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    store = open_store(spec)
    versions = {v.version: v.sha256 for v in store.list_versions("acme", "birds")}
    for version, sha in acked:
        assert versions[int(version)] == sha
        assert store.get("acme", "birds", int(version)).info.sha256 == sha
    store.close()


def _open_handles(path: Path) -> int:
    """File descriptors of this process open on ``path`` (one per SQLite connection)."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(fd) == str(path)
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts handles in /proc/self/fd (Linux)")
def test_sqlite_connections_stay_bounded_across_thread_turnover(tmp_path):
    """Bursts of reads from threads that are started for each burst and then end (as a server's worker threads
    are retired and replaced): the open handles stay at the pool's size, and are returned at close."""
    store = open_store(str(tmp_path / "store"))
    assert isinstance(store, SqlitePromptStore)
    path = store.path.resolve()
    store.put("acme", "birds", blob())
    seen = []
    for _burst in range(4):
        with ThreadPoolExecutor(30) as pool:  # 30 fresh threads per burst
            list(pool.map(lambda _: (store.get("acme", "birds"), store.state("acme", "birds")), range(120)))
        seen.append(_open_handles(path))
    assert max(seen) <= DEFAULT_POOL_SIZE and store.open_connections <= DEFAULT_POOL_SIZE, seen
    store.close()
    assert _open_handles(path) == 0 and store.open_connections == 0
    with pytest.raises(StoreUnavailable):
        store.get("acme", "birds")


FAULTS = {
    "stopped": (lambda s: s.stop(), lambda s: s.restart()),
    "killed": (lambda s: s.kill(), lambda s: s.restart()),
    "sigstop": (lambda s: s.pause(), lambda s: s.resume()),
    # Long enough for the checks below (7 calls x TIMEOUT_S); Redis < 7.2 holds UNPAUSE until it expires.
    "client_pause": (lambda s: s.client_pause(2500), lambda s: s.client_unpause()),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_redis_unavailable_is_raised_within_the_timeout(redis_server, fault):
    writer = open_store(redis_server.url, timeout_s=TIMEOUT_S)
    watcher = open_store(redis_server.url, timeout_s=TIMEOUT_S)
    writer.put("acme", "birds", blob())
    events = Events()
    sub = watcher.subscribe(events, reconcile_s=0.5)
    try:
        inject, undo = FAULTS[fault]
        inject(redis_server)
        for name, call in [
            ("put", lambda: writer.put("acme", "birds", blob())),
            ("get", lambda: writer.get("acme", "birds")),
            ("active_version", lambda: writer.active_version("acme", "birds")),
            ("list_tasks", lambda: writer.list_tasks("acme")),
            ("activate", lambda: writer.activate("acme", "birds", 1)),
            ("snapshot", writer.snapshot),
            ("ping", writer.ping),
        ]:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as err:
                call()
            elapsed = time.monotonic() - t0
            assert err.value.code == "store_unavailable"
            assert elapsed < TIMEOUT_S + SLACK_S, f"{name} took {elapsed:.2f}s under {fault}"
        undo(redis_server)
        # Recovers without reopening; the watcher thread survived and delivers the next change.
        deadline = time.monotonic() + 5
        while True:
            try:
                v = writer.put("acme", "birds", blob())
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        events.wait_for(ChangeEvent("acme", "birds", v.revision, v.version, v.sha256), 3.0)
        assert sub.alive
    finally:
        sub.close()
        writer.close()
        watcher.close()


def test_redis_client_pause_write_fails_writes_fast_and_keeps_reads(redis_server):
    store = open_store(redis_server.url, timeout_s=TIMEOUT_S)
    a = blob()
    store.put("acme", "birds", a)
    redis_server.client_pause(10_000, "WRITE")
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.put("acme", "birds", blob())
        assert time.monotonic() - t0 < TIMEOUT_S + SLACK_S
        assert store.get("acme", "birds").data == a  # cached-path reads still work
    finally:
        redis_server.client_unpause()
        store.close()


def test_redis_url_with_password_acl_user_and_db(tmp_path):
    if not RedisServer.available():
        pytest.skip("redis-server is not installed")
    with RedisServer(data_dir=tmp_path / "r", password="s3cret") as srv:
        with srv.client() as c:
            c.execute_command("ACL", "SETUSER", "lpt", "on", ">pw2", "~lpt:*", "&lpt:*", "+@all", "-@dangerous")
            c.execute_command("ACL", "SETUSER", "lpt", "+ping", "+client|setname")
        base = f"127.0.0.1:{srv.port}"
        by_password = open_store(f"redis://:s3cret@{base}/3", timeout_s=TIMEOUT_S)
        by_user = open_store(f"redis://lpt:pw2@{base}/3", timeout_s=TIMEOUT_S)
        other_db = open_store(f"redis://:s3cret@{base}/4", timeout_s=TIMEOUT_S)
        try:
            v = by_password.put("acme", "birds", blob())
            assert by_user.get("acme", "birds").info == v
            assert other_db.list_tenants() == []
            assert "s3cret" not in repr(by_password) and "s3cret" not in by_password.url
            for url in (f"redis://:wrong@{base}/3", f"redis://{base}/3"):
                bad = open_store(url, timeout_s=TIMEOUT_S)
                with pytest.raises(StoreUnavailable) as err:
                    bad.ping()
                assert "wrong" not in str(err.value)
                bad.close()
        finally:
            for s in (by_password, by_user, other_db):
                s.close()


def test_redis_over_tls(tmp_path):
    if not RedisServer.available() or shutil.which("openssl") is None:
        pytest.skip("needs redis-server (with TLS) and the openssl CLI")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    with RedisServer(data_dir=tmp_path / "r", password="pw", tls_cert=cert, tls_key=key) as srv:
        assert srv.url.startswith("rediss://")
        store = open_store(srv.url, timeout_s=1.0)
        data = blob()
        assert store.put("acme", "birds", data).version == 1 and store.get("acme", "birds").data == data
        store.close()
        plain = open_store(srv.url.replace("rediss://", "redis://").split("?")[0], timeout_s=TIMEOUT_S)
        with pytest.raises(StoreUnavailable):  # a plain-text client cannot talk to a TLS port
            plain.ping()
        plain.close()
