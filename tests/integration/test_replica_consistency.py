"""A replica serves exactly what the shared store holds active, whatever order its news arrives in.

Each test opens a race window on purpose: a store wrapper holds the replica's load (or its upload) at a gate
while "another replica" (the test, writing the same store) changes the task, and the replica's store watcher
delivers that change. Only then is the gate opened. Nothing depends on timing: the wrapper says when the replica
is inside the window, and the watcher's callback says when the change has been handled. Run against the embedded
SQLite store and a real redis-server.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from lpt.errors import StoreUnavailable
from prompts_store import open_store
from prompts_store.base import PromptStore
from prompts_store.cli import main as store_cli
from tests.support.images import image_bytes
from tests.support.prompt_sets import prompt_bytes
from tests.support.service_app import Served, make_config, serve_in_thread
from tests.support.waiting import wait_until

TENANT = "default"
EVENT_TIMEOUT_S = 15.0


class Gate:
    """Holds the next call that passes it, once armed: ``reached`` says the call is inside, ``opened`` lets it go."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.reached = threading.Event()
        self.opened = threading.Event()

    def arm(self) -> None:
        self.armed.set()

    def open(self) -> None:
        self.opened.set()

    def pass_through(self) -> None:
        if self.armed.is_set():
            self.armed.clear()
            self.reached.set()
            assert self.opened.wait(30)


class GatedStore:
    """A real store whose ``get`` and ``put`` can be held at a gate (after the store answered), whose change events
    are recorded after the replica handled them, and whose reads can be made to fail."""

    def __init__(self, inner: PromptStore):
        self.inner = inner
        self.get_gate = Gate()
        self.put_gate = Gate()
        self.reads_fail = False
        self.handled: list[Any] = []  # every change event, appended once the replica's callback returned
        self._lock = threading.Lock()

    def get(self, *args: Any) -> Any:
        blob = self.inner.get(*args)
        self.get_gate.pass_through()
        return blob

    def put(self, *args: Any) -> Any:
        stored = self.inner.put(*args)
        self.put_gate.pass_through()
        return stored

    def active_version(self, *args: Any) -> Any:
        if self.reads_fail:
            raise StoreUnavailable(message="injected: the store is unreachable")
        return self.inner.active_version(*args)

    def subscribe(self, callback: Callable[[Any], None], reconcile_s: float = 2.0) -> Any:
        def recording(event: Any) -> None:
            callback(event)
            with self._lock:
                self.handled.append(event)

        self.callback = recording
        return self.inner.subscribe(recording, reconcile_s)

    def wait_handled(self, task: str, active: int | None) -> Any:
        """The first event for ``task`` at ``active`` the replica has handled (waits for it)."""

        def found() -> Any:
            with self._lock:
                return next((e for e in self.handled if e.task == task and e.active == active), None)

        wait_until(found, EVENT_TIMEOUT_S, f"the replica to handle the change of {task!r} to {active}")
        return found()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(params=["sqlite", "redis"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "store")
    return request.getfixturevalue("redis_server").url


@pytest.fixture
def other(store_spec: str) -> Iterator[PromptStore]:
    """Another replica's view of the shared store: its writes reach the served replica only through the store."""
    store = open_store(store_spec)
    yield store
    store.close()


@pytest.fixture
def gated(store_spec: str) -> Iterator[GatedStore]:
    store = open_store(store_spec)
    yield GatedStore(store)
    store.close()


@pytest.fixture
def served(tmp_path: Path, backbone, gated: GatedStore) -> Iterator[Served]:
    config = make_config(tmp_path, reconcile_s=0.3)
    with serve_in_thread(config, backbone, store=gated) as s:
        yield s


def classes_of(backbone, tag: str) -> bytes:
    """A set whose class names say which upload it is."""
    return prompt_bytes(backbone.info, classes=[f"{tag}-x", f"{tag}-y", f"{tag}-z"], seed=sum(map(ord, tag)))


def classify(served: Served, task: str = "a") -> tuple[int, str]:
    """(status, the tag of the set that answered, from its class names)."""
    r = served.post(f"/v1/classify?task={task}&top_k=1", content=image_bytes(0))
    if r.status_code != 200:
        return r.status_code, ""
    return 200, r.json()["predictions"][0]["label"].split("-")[0]


def wipe(store_spec: str) -> None:
    """Lose everything the store holds, as a failed disk or a Redis failover to an empty replica would."""
    if store_spec.startswith("redis"):
        redis.Redis.from_url(store_spec).flushall()
        return
    with contextlib.closing(sqlite3.connect(Path(store_spec) / "prompts.sqlite")) as conn, conn:
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            conn.execute(f"DELETE FROM {table}")


def in_background(fn: Callable[[], Any]) -> Future:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def test_upload_during_a_cold_load_is_served_after_it(served: Served, gated: GatedStore, other, backbone) -> None:
    other.put(TENANT, "a", classes_of(backbone, "one"))
    gated.wait_handled("a", 1)
    gated.get_gate.arm()
    first = in_background(lambda: classify(served))
    assert gated.get_gate.reached.wait(30)  # the replica is loading v1
    other.put(TENANT, "a", classes_of(backbone, "two"))
    gated.wait_handled("a", 2)
    gated.get_gate.open()
    assert first.result(30)[0] == 200  # it asked before the upload: either answer is right
    assert [classify(served) for _ in range(3)] == [(200, "two")] * 3


def test_delete_during_a_cold_load_does_not_bring_the_task_back(
    served: Served, gated: GatedStore, other, backbone
) -> None:
    other.put(TENANT, "a", classes_of(backbone, "one"))
    gated.wait_handled("a", 1)
    gated.get_gate.arm()
    first = in_background(lambda: classify(served))
    assert gated.get_gate.reached.wait(30)
    other.delete(TENANT, "a")
    gated.wait_handled("a", None)
    gated.get_gate.open()
    first.result(30)
    assert classify(served) == (404, "")
    assert not [k for k in served.state.prompt_sets.cache.table.in_lru_order() if k.task == "a"]


def test_rollback_between_an_upload_and_its_install_wins(served: Served, gated: GatedStore, other, backbone) -> None:
    other.put(TENANT, "a", classes_of(backbone, "one"))
    first = gated.wait_handled("a", 1)
    assert classify(served) == (200, "one")
    gated.put_gate.arm()
    upload = in_background(lambda: served.post("/v1/prompts?task=a", content=classes_of(backbone, "two")))
    assert gated.put_gate.reached.wait(30)  # v2 is stored; this replica has not installed it yet
    other.activate(TENANT, "a", 1)
    wait_until(lambda: [e for e in rolled_back(gated) if e is not first], EVENT_TIMEOUT_S, "the rollback's event")
    gated.put_gate.open()
    assert upload.result(30).status_code == 201
    assert [classify(served) for _ in range(3)] == [(200, "one")] * 3


def rolled_back(gated: GatedStore) -> list[Any]:
    """Handled events that report task ``a`` at v1."""
    return [e for e in gated.handled if e.task == "a" and e.active == 1]


def test_a_stale_event_does_not_undo_a_newer_upload(served: Served, gated: GatedStore, other, backbone) -> None:
    other.put(TENANT, "a", classes_of(backbone, "one"))
    old_event = gated.wait_handled("a", 1)
    assert classify(served) == (200, "one")
    assert served.post("/v1/prompts?task=a", content=classes_of(backbone, "two")).status_code == 201
    gated.reads_fail = True  # a replica that cannot confirm an event with the store
    gated.callback(old_event)  # events may repeat and arrive late
    assert [classify(served) for _ in range(3)] == [(200, "two")] * 3


def test_a_version_number_reused_after_data_loss_never_serves_the_lost_bytes(
    served: Served, gated: GatedStore, other, backbone, store_spec: str, tmp_path: Path
) -> None:
    other.put(TENANT, "a", classes_of(backbone, "one"))
    gated.wait_handled("a", 1)
    archive = tmp_path / "backup.tar"
    assert store_cli(["store", "export", "--store", store_spec, "--out", str(archive)]) == 0  # holds v1 only
    other.put(TENANT, "a", classes_of(backbone, "lost"))
    gated.wait_handled("a", 2)
    assert classify(served) == (200, "lost")  # v2 is resident on this replica
    # The store loses v2: it is wiped and the older backup imported, while this replica keeps its cache.
    wipe(store_spec)
    assert store_cli(["store", "import", "--store", store_spec, str(archive)]) == 0
    other.put(TENANT, "a", classes_of(backbone, "new"))  # numbered v2 again, with other bytes
    assert other.active_version(TENANT, "a").version == 2
    wait_until(lambda: classify(served) == (200, "new"), EVENT_TIMEOUT_S, "the reissued v2 to be served")
    r = served.post("/v1/classify?task=a", content=image_bytes(0))
    assert r.json()["sha256"] == other.active_version(TENANT, "a").sha256
    pinned = served.post("/v1/classify?task=a&version=2&top_k=1", content=image_bytes(0))
    assert pinned.json()["predictions"][0]["label"].startswith("new-")


def test_a_store_that_lost_a_task_stops_serving_it_here(
    served: Served, gated: GatedStore, other, backbone, store_spec: str
) -> None:
    other.put(TENANT, "a", classes_of(backbone, "one"))
    gated.wait_handled("a", 1)
    assert classify(served) == (200, "one")
    wipe(store_spec)  # no write follows: only the reconcile snapshot tells the replica
    wait_until(lambda: classify(served) == (404, ""), EVENT_TIMEOUT_S, "the lost task to answer 404")
