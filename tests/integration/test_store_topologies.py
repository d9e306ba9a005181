"""The store and the service on Redis as production runs it, each against real processes on loopback ports: TLS
with a CA made by the test and an ACL user limited to the service's keys (the rules docs/store.md gives), Sentinel
with failovers under traffic, and a Redis Cluster of three primaries; and specs that are refused at start."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from lpt.errors import StoreUnavailable
from prompts_store import TaskState, check_spec, open_store
from prompts_store.base import GcReport
from prompts_store.cli import main as lpt_main
from prompts_store.redis_store import RedisPromptStore
from service.cli import load_config
from tests.support.images import image_bytes
from tests.support.prompt_sets import prompt_bytes
from tests.support.redis_server import ClusterGroup, RedisServer, SentinelGroup, make_tls_files, require_redis
from tests.support.service_app import Served, make_config, serve_in_thread
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
OCTETS = {"Content-Type": "application/octet-stream"}
PNG = {"Content-Type": "image/png"}


def acl_rules(topology: str) -> list[list[str]]:
    """The ``ACL SETUSER lpt ...`` lines docs/store.md gives (every topology, plus the Cluster's line for one),
    as arguments after ``ACL SETUSER``, with the password ``pw``."""
    text = (ROOT / "docs" / "store.md").read_text()
    lines = re.findall(r"^ACL SETUSER lpt .*$", text, flags=re.M)
    assert len(lines) == 2, lines
    rules = [line.replace(">PASSWORD", ">pw").split()[2:] for line in lines]
    return rules if topology == "cluster" else rules[:1]


def set_acl_user(client: redis.Redis, topology: str) -> None:
    for rule in acl_rules(topology):
        client.execute_command("ACL", "SETUSER", *rule)
    client.execute_command("ACL", "LOG", "RESET")


def denied(client: redis.Redis) -> list[Any]:
    """What the ACL refused since the last reset (empty when the rules cover everything the service did)."""
    return client.execute_command("ACL", "LOG")


# -- specs refused at start ----------------------------------------------------------------------------------------
REFUSED = {
    "valkey://:s3cret@127.0.0.1:6379/0": "unsupported store",
    "Redis://127.0.0.1:6379": "unsupported store",
    "something://data/store": "unsupported store",
    "redis+sentinel://:s3cret@127.0.0.1:26379": "MASTER_NAME",
    "redis://:s3cret@127.0.0.1:1,127.0.0.1:2/0": "several hosts",
    "redis+cluster://:s3cret@127.0.0.1:7000/3": "only database 0",
}


@pytest.mark.parametrize("spec", REFUSED)
def test_a_spec_the_store_cannot_use_stops_the_start_with_one_line_and_creates_nothing(
    spec, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        check_spec(spec)
    message = str(err.value)
    assert REFUSED[spec] in message and "\n" not in message and "s3cret" not in message
    if REFUSED[spec] == "unsupported store":
        assert "redis://, rediss://" in message and "redis+sentinel://" in message and "redis+cluster://" in message
    with pytest.raises(ValueError):
        open_store(spec)

    for argv, env in ((["--store", spec], {}), ([], {"LPT_STORE": spec})):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as stop:
            load_config(argv)
        line = str(stop.value.code)
        assert line.startswith("lpt-serve: invalid settings:") and REFUSED[spec] in line
        assert "\n" not in line and "s3cret" not in line
    monkeypatch.delenv("LPT_STORE")

    assert lpt_main(["store", "list", "--store", spec]) == 1
    err_line = capsys.readouterr().err
    assert err_line.count("\n") == 1 and REFUSED[spec] in err_line and "s3cret" not in err_line
    assert list(tmp_path.iterdir()) == []  # no directory named after the URL, nothing at all


def test_passwords_never_show_in_reprs_errors_or_logs(caplog):
    caplog.set_level(logging.DEBUG)
    specs = [
        "redis://lpt:s3cret@127.0.0.1:1/0",
        "redis+sentinel://lpt:s3cret@127.0.0.1:1,127.0.0.1:2/lpt?sentinel_password=s3cret",
        "rediss+cluster://lpt:s3cret@127.0.0.1:1?ssl_cert_reqs=none",
    ]
    for spec in specs:
        store = open_store(spec, timeout_s=0.2)
        assert "s3cret" not in repr(store) and "***" in repr(store)
        with pytest.raises(StoreUnavailable) as err:
            store.ping()  # nothing listens on port 1
        assert "s3cret" not in str(err.value)
        sub = store.subscribe(lambda _ev: None, reconcile_s=0.2)
        time.sleep(0.3)
        sub.close()
        store.close()
    assert caplog.records and all("s3cret" not in r.getMessage() for r in caplog.records)


# -- TLS and an ACL user -------------------------------------------------------------------------------------------
@pytest.mark.redis
def test_the_service_runs_over_tls_with_a_client_certificate_and_an_acl_user(backbone, tmp_path):
    tls = make_tls_files(tmp_path / "tls")
    with RedisServer(tmp_path / "redis", password="admin-secret", tls=tls) as srv:
        with srv.client() as admin:
            set_acl_user(admin, "server")
            admin.set("other:secret", "not the service's")
        query = f"ssl_ca_certs={tls.ca}&ssl_certfile={tls.client_cert}&ssl_keyfile={tls.client_key}"
        url = f"rediss://lpt:pw@127.0.0.1:{srv.port}/0?{query}"
        config = make_config(tmp_path / "svc", store=url, keep_inactive_versions=1, max_tasks_per_tenant=5)
        sets = [prompt_bytes(backbone.info, classes=3, seed=s) for s in range(3)]
        with serve_in_thread(config, backbone) as s:
            for data in sets:
                assert s.post("/v1/prompts", params={"task": "birds"}, content=data, headers=OCTETS).status_code == 201
            r = s.post("/v1/classify", params={"task": "birds"}, content=image_bytes(1), headers=PNG)
            assert r.status_code == 200 and r.json()["version"] == 3, r.text
            assert [v["version"] for v in s.get("/v1/prompts/birds").json()["versions"]] == [2, 3]  # retention
            assert s.post("/v1/prompts/birds/activate", params={"version": 2}).status_code == 200
            assert s.delete("/v1/prompts/birds").status_code == 200
        with srv.client() as admin:
            assert denied(admin) == []  # the documented rules cover everything the service did

        store = open_store(url, timeout_s=1.0)
        assert store.state("default", "birds").active is None and store.state("default", "birds").revision > 0
        store.close()
        limited = redis.Redis.from_url(url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.get("other:secret")  # only the service's keys
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.flushall()
        limited.close()
        plain = open_store(f"redis://lpt:pw@127.0.0.1:{srv.port}/0", timeout_s=0.3)
        with pytest.raises(StoreUnavailable):
            plain.ping()  # a plain-text client cannot talk to the TLS port
        plain.close()


# -- Sentinel -----------------------------------------------------------------------------------------------------
class Traffic:
    """Classify and upload loops against one app, recording every answer, until ``stop``."""

    def __init__(self, served: Served, image: bytes, sets: list[bytes]):
        self.served = served
        self.image = image
        self.sets = sets
        self.classified: list[int] = []
        self.uploads: list[tuple[float, int, dict[str, Any], dict[str, str]]] = []
        self.failed: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._guard(f)) for f in (self._classify, self._upload)]

    def _guard(self, loop: Any) -> Any:
        def run() -> None:
            try:
                loop()
            except BaseException as e:
                self.failed.append(e)

        return run

    def _classify(self) -> None:
        while not self._stop.is_set():
            r = self.served.post("/v1/classify", params={"task": "hot"}, content=self.image, headers=PNG)
            self.classified.append(r.status_code)
            time.sleep(0.01)

    def _upload(self) -> None:
        i = 0
        while not self._stop.is_set() and i < len(self.sets):
            r = self.served.post("/v1/prompts", params={"task": "up"}, content=self.sets[i], headers=OCTETS)
            self.uploads.append((time.monotonic(), r.status_code, r.json(), dict(r.headers)))
            if r.status_code in (200, 201):
                i += 1  # else retry the same bytes, as a client does after a 503
            else:
                time.sleep(0.05)

    def acked_after(self, t: float) -> int:
        return sum(1 for when, status, _, _ in self.uploads if when > t and status == 201)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


@pytest.mark.slow
@pytest.mark.redis
def test_a_killed_primary_loses_no_acknowledged_upload_and_classify_keeps_answering(backbone, tmp_path):
    with SentinelGroup(tmp_path / "sentinel") as sg:
        config = make_config(tmp_path / "svc", store=sg.url, store_timeout=0.5, reconcile_s=0.5)
        sets = [prompt_bytes(backbone.info, classes=3, seed=s) for s in range(40)]
        with serve_in_thread(config, backbone) as s:
            hot = prompt_bytes(backbone.info, classes=4, seed=99)
            # The first write waits for the replica the sentinels report; right after the group starts that
            # report can still be settling (503, retryable): what is tested starts with the kill below.
            wait_until(
                lambda: (
                    s.post("/v1/prompts", params={"task": "hot"}, content=hot, headers=OCTETS).status_code in (200, 201)
                ),
                20,
                "the first upload to be acknowledged",
            )
            with Traffic(s, image_bytes(7), sets) as traffic:
                wait_until(lambda: traffic.acked_after(0) >= 3 or traffic.failed, 20, "uploads before the kill")
                killed_at = time.monotonic()
                old = sg.kill_primary()
                new = sg.wait_new_primary(old)
                wait_until(lambda: traffic.acked_after(killed_at) >= 3 or traffic.failed, 30, "uploads after it")
            assert not traffic.failed, traffic.failed

        statuses = {status for _, status, _, _ in traffic.uploads}
        assert statuses <= {200, 201, 503} and 503 in statuses, traffic.uploads  # 503 during the switch only
        for _, status, body, headers in traffic.uploads:
            if status == 503:
                assert headers.get("retry-after") and body["error"]["code"].startswith("store_"), body
        assert set(traffic.classified) == {200}, sorted(set(traffic.classified))  # from the cache throughout

        acked = [body for _, status, body, _ in traffic.uploads if status in (200, 201)]
        store = open_store(sg.url, timeout_s=1.0)
        try:
            for body in acked:  # every acknowledged upload is on the new primary, bytes and all
                assert store.get("default", "up", body["version"]).info.sha256 == body["sha256"]
            assert store.active_version("default", "up").sha256 == acked[-1]["sha256"]
        finally:
            store.close()
        assert new != old


@pytest.mark.slow
@pytest.mark.redis
def test_sentinel_failover_under_writes_keeps_every_acknowledged_version_and_revisions_grow(tmp_path):
    with SentinelGroup(tmp_path / "sentinel") as sg:
        writer = open_store(sg.url, timeout_s=0.5)
        watcher = open_store(sg.url, timeout_s=0.5)
        events: list[TaskState] = []
        sub = watcher.subscribe(events.append, reconcile_s=0.5)
        acked: list[tuple[int, str, int]] = []
        refused: list[str] = []
        stop = threading.Event()

        def write() -> None:
            while not stop.is_set():
                try:
                    v = writer.put("acme", "birds", os.urandom(200))
                    acked.append((v.version, v.sha256, v.revision))
                except StoreUnavailable as e:
                    refused.append(e.code)
                    time.sleep(0.02)

        thread = threading.Thread(target=write)
        thread.start()
        try:
            wait_until(lambda: len(acked) >= 5, 10, "writes before the failover")
            old = sg.primary_port()
            sg.failover()
            count = len(acked)
            wait_until(lambda: len(acked) >= count + 5, 20, "writes after the failover")
        finally:
            stop.set()
            thread.join(10)
        revisions = [r for _, _, r in acked]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
        assert set(refused) <= {"store_unavailable", "store_unreplicated"}, refused
        for version, sha, _ in acked:
            assert writer.get("acme", "birds", version).info.sha256 == sha
        assert sg.primary_port() != old  # read above from the new primary: every acknowledged write is there
        wait_until(lambda: events and events[-1] == writer.state("acme", "birds"), 5, "the watcher to follow")
        sub.close()
        writer.close()
        watcher.close()


@pytest.mark.redis
def test_min_replicas_refuses_to_acknowledge_a_write_no_replica_holds(redis_server):
    store = open_store(redis_server.url.replace("/0", "/0?min_replicas=1"), timeout_s=0.3)
    with pytest.raises(StoreUnavailable) as err:
        store.put("acme", "birds", b"x" * 10)
    assert err.value.code == "store_unreplicated"
    with pytest.raises(StoreUnavailable):
        store.put("acme", "birds", b"x" * 10)  # a retry is refused the same way
    # The upload's first write (the tenant's usage reservation) waits for a replica too: refused there, the
    # task itself is never written, so nothing unacknowledged can be served.
    assert store.state("acme", "birds").active is None
    store.close()


# -- Cluster ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ClusterGroup]:
    require_redis()
    with ClusterGroup(tmp_path_factory.mktemp("cluster"), password="admin-secret") as group:
        for node in group.nodes:
            with node.client() as c:
                set_acl_user(c, "cluster")
        yield group


def received(pubsub: Any, count: int, timeout: float = 3.0) -> list[dict]:
    """Up to ``count`` change messages from ``pubsub`` within ``timeout`` (None from redis-py can be a skipped
    subscribe confirmation, so only the deadline ends the wait)."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.1)
        if msg is not None:
            got.append(json.loads(msg["data"]))
    return got


def cluster_url(cluster: ClusterGroup) -> str:
    return cluster.url.replace(":admin-secret@", "lpt:pw@")


@pytest.mark.slow
@pytest.mark.redis
def test_cluster_transactions_keep_each_task_in_one_slot_and_changes_reach_every_node(cluster):
    url = cluster_url(cluster)
    store, watcher = open_store(url, timeout_s=1.0), open_store(url, timeout_s=1.0)
    assert isinstance(store, RedisPromptStore) and store.topology == "cluster"
    events: list[TaskState] = []
    sub = watcher.subscribe(events.append, reconcile_s=30)  # push only: reconciliation would hide a lost message
    listeners = []
    for node in cluster.nodes:  # a subscriber on every node: PUBLISH inside the MULTI reaches all of them
        client = redis.Redis(port=node.port, username="lpt", password="pw")
        ps = client.pubsub(ignore_subscribe_messages=True)
        ps.subscribe("lpt:changes")
        listeners.append((client, ps))
    time.sleep(0.3)
    try:
        tasks = [f"t{i}" for i in range(12)]
        for task in tasks:
            for _ in range(2):
                store.put("cl-tenant", task, os.urandom(100))
        store.activate("cl-tenant", "t0", 1)
        store.delete("cl-tenant", "t1")
        store.restore_version("cl-tenant", "t2", 9, b"restored", 1.0)

        admin = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, password="admin-secret")
        nodes = set()
        for task in tasks:
            keys = [k.decode() for k in admin.scan_iter(match=f"lpt:{{cl-tenant/{task}}}:*", target_nodes="all")]
            assert keys and len({admin.keyslot(k) for k in keys}) == 1, keys  # one slot per task
            nodes.add(admin.get_node_from_key(keys[0]).port)
        assert len(nodes) == 3  # the tasks are spread over every primary
        admin.close()

        want = store.snapshot()
        assert {k: s for k, s in want.items() if k[0] == "cl-tenant"} == {
            ("cl-tenant", t): store.state("cl-tenant", t) for t in tasks
        }
        assert store.list_tasks("cl-tenant") == sorted(set(tasks) - {"t1"})
        assert [v.version for v in store.list_versions("cl-tenant", "t2")] == [1, 2, 9]
        wait_until(lambda: len(events) >= 2 * len(tasks) + 3, 5, "every change to be pushed")
        for key, state in want.items():
            if key[0] == "cl-tenant":
                assert [e for e in events if (e.tenant, e.task) == key][-1] == state
        for _client, ps in listeners:
            assert len(received(ps, 2 * len(tasks) + 3)) == 2 * len(tasks) + 3
        assert store.usage("cl-tenant").tasks == len(tasks) - 1
        # Retention keeps each task's active version and the one active before it: only t2's restored v9 goes.
        assert store.gc(0) == GcReport(1, 1, len(b"restored"))
        assert [v.version for v in store.list_versions("cl-tenant", "t2")] == [1, 2]
    finally:
        for client, ps in listeners:
            ps.close()
            client.close()
        sub.close()
        store.close()
        watcher.close()
    for node in cluster.nodes:
        with node.client() as c:
            assert denied(c) == []


@pytest.mark.slow
@pytest.mark.redis
def test_concurrent_writes_of_one_task_on_a_cluster_are_never_lost(cluster):
    stores = [open_store(cluster_url(cluster), timeout_s=1.0) for _ in range(2)]
    payloads = [os.urandom(300) for _ in range(20)]
    start = threading.Barrier(len(payloads))
    results = []

    def put(i: int) -> None:
        start.wait()
        results.append(stores[i % 2].put("cl-race", "hot", payloads[i]))

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    versions = {v.version: v.sha256 for v in stores[0].list_versions("cl-race", "hot")}
    assert sorted(versions) == list(range(1, 21)) and {r.version: r.sha256 for r in results} == versions
    revisions = sorted(r.revision for r in results)
    assert len(set(revisions)) == 20 and stores[1].state("cl-race", "hot").revision == revisions[-1]
    for s in stores:
        s.close()


@pytest.mark.slow
@pytest.mark.redis
def test_the_service_runs_on_a_cluster_and_follows_another_writer(backbone, cluster, tmp_path):
    url = cluster_url(cluster)
    config = make_config(tmp_path, store=url, reconcile_s=30)  # only pushed changes can be this fast
    first, second = (prompt_bytes(backbone.info, classes=3, seed=s) for s in (11, 12))
    with serve_in_thread(config, backbone) as s:
        assert s.post("/v1/prompts", params={"task": "cl-app"}, content=first, headers=OCTETS).status_code == 201
        r = s.post("/v1/classify", params={"task": "cl-app"}, content=image_bytes(3), headers=PNG)
        assert r.status_code == 200 and r.json()["version"] == 1
        other = open_store(url, timeout_s=1.0)
        v2 = other.put("default", "cl-app", second)
        other.close()

        def serves_v2() -> bool:
            r = s.post("/v1/classify", params={"task": "cl-app"}, content=image_bytes(3), headers=PNG)
            return r.status_code == 200 and r.json()["sha256"] == v2.sha256

        wait_until(serves_v2, 5, "the replica to serve the version another writer uploaded")
        assert s.delete("/v1/prompts/cl-app").status_code == 200
