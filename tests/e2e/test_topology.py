"""The compose `scale` topology from real processes, without Docker: redis-server (password, AOF), two
lpt-serve replicas configured by the same LPT_* environment compose gives them, nginx running the same
routing template, and Prometheus running the same scrape config (targets rewritten to local ports).

Uploads go through one replica; classify goes through nginx; each task must always reach the same replica
(seen in each replica's own lpt_requests_total and its X-LPT-Replica header); Prometheus must scrape both.
Loopback only; every process is started here and stopped at the end, every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy import configs as cfg
from tests.support.images import image_bytes
from tests.support.lpt_serve import LptServe
from tests.support.metrics import metric_samples
from tests.support.ports import free_port
from tests.support.processes import LoggedProcess
from tests.support.prompt_sets import prompt_bytes
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.topology, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(420)]

BACKBONE = ("test_vit", "random:0", 32)
TENANT, SECRET = "acme", "acme-topology-secret-0123"
REDIS_PASSWORD = "topology0123456789abcdef"
NUM_TASKS = 24  # enough that both replicas get tasks whatever ports the hash ring sees (miss chance < 1e-4)
CLASSIFY_REPEATS = 3
START_TIMEOUT = 150.0
SCRAPE_TIMEOUT = 60.0


def wait_while_alive(
    what: str, check: Callable[[], bool], timeout: float, procs: Sequence[LoggedProcess], interval: float = 0.2
) -> None:
    """``wait_until`` ``check`` holds, failing at once when one of ``procs`` dies, with all their logs on timeout."""

    def holds() -> bool:
        for p in procs:
            p.assert_alive(what)
        return check()

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)

    wait_until(holds, timeout, what, interval=interval, retry_on=(httpx.HTTPError, OSError), details=logs)


def status_is(url: str, code: int = 200) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2.0).status_code == code


@dataclass
class Topology:
    replicas: dict[str, str]  # compose service name -> 127.0.0.1:PORT
    replica_ids: dict[str, str]  # compose service name -> LPT_REPLICA_ID
    proxy: str
    prometheus: str
    procs: list[LoggedProcess]


def _replica_env(name: str, port: int, store: str, data_dir: Path, secrets_dir: Path) -> dict[str, str]:
    """The environment compose gives replica ``name`` as its entrypoint (docker/lpt_secrets.py) completes it
    from the secrets in ``secrets_dir``, with what differs on this machine replaced: loopback, the local
    Redis, a small seeded backbone on CPU, a data dir per replica (the launcher adds it to a clean environment)."""
    env = cfg.lpt_secrets().service_environment(secrets_dir, cfg.env_dict(cfg.compose()["services"][name]))
    model, weights, img_size = BACKBONE
    env.update(
        LPT_HOST="127.0.0.1",
        LPT_PORT=str(port),
        LPT_STORE=store,
        LPT_BACKBONE=model,
        LPT_BACKBONE_WEIGHTS=weights,
        LPT_IMG_SIZE=str(img_size),
        LPT_DEVICE="cpu",
        LPT_DATA_DIR=str(data_dir),
        LPT_CACHE_BYTES=str(64 * 1024**2),
        LPT_GRPC_PORT=str(free_port()),  # each container has its own 8001; on one host each replica needs its own
        HF_HUB_OFFLINE="1",
    )
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def topology(tmp_path_factory) -> Iterator[Topology]:
    redis_bin = cfg.require_binary("redis-server")
    nginx_bin = cfg.require_binary("nginx")
    prometheus_bin = cfg.require_binary("prometheus")
    root = tmp_path_factory.mktemp("topology")
    procs: list[LoggedProcess] = []
    redis = RedisServer(data_dir=root / "redis", password=REDIS_PASSWORD, binary=redis_bin)
    try:
        redis.start()
        doc = cfg.compose()
        # The secrets service's files, from the docker/secrets/ files a user would write.
        secrets_dir, chosen = root / "secrets", root / "chosen"
        chosen.mkdir()
        (chosen / "api-keys").write_text(f"{TENANT}:{SECRET}\n")
        (chosen / "redis-password").write_text(REDIS_PASSWORD)
        cfg.lpt_secrets().init(secrets_dir, chosen)
        names = cfg.lpt_replicas(doc)
        assert names == ["service", "service-2"], names
        replicas = {n: f"127.0.0.1:{free_port()}" for n in names}
        ids = {}
        for n in names:
            port = int(replicas[n].rsplit(":", 1)[1])
            env = _replica_env(n, port, redis.url, root / n, secrets_dir)
            ids[n] = env["LPT_REPLICA_ID"]
            procs.append(LptServe(root / f"{n}.log", env=env, port=port, listen_flags=False).start(ready=False))

        proxy = f"127.0.0.1:{free_port()}"
        nginx_dir = root / "nginx"
        nginx_dir.mkdir()
        snippet = nginx_dir / "lpt.conf"
        snippet.write_text(cfg.render_nginx(proxy, replicas, doc))
        main_conf = nginx_dir / "nginx.conf"
        main_conf.write_text(cfg.nginx_main_conf(nginx_dir, snippet))

        prometheus = f"127.0.0.1:{free_port()}"
        prom_conf = root / "prometheus.yml"
        prom_conf.write_text(yaml.safe_dump(cfg.local_prometheus_config(replicas, scrape_interval="1s")))

        for n in names:
            wait_while_alive(f"{n} /readyz", status_is(f"http://{replicas[n]}/readyz"), START_TIMEOUT, procs)
        nginx_args = [nginx_bin, "-p", str(nginx_dir), "-c", str(main_conf)]
        procs.append(LoggedProcess("nginx", nginx_args, root / "nginx.out").start())
        prom_args = [
            prometheus_bin,
            f"--config.file={prom_conf}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address={prometheus}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        procs.append(LoggedProcess("prometheus", prom_args, root / "prometheus.log").start())
        wait_while_alive("nginx", status_is(f"http://{proxy}/healthz"), 30, procs)
        wait_while_alive("prometheus /-/ready", status_is(f"http://{prometheus}/-/ready"), 60, procs)
        yield Topology(replicas, ids, proxy, prometheus, procs)
    finally:
        for p in reversed(procs):
            p.stop()
        redis.cleanup()


# -- helpers -----------------------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {SECRET}"}


def _prompt_sets(n: int) -> dict[str, bytes]:
    from lpt.backbone import load_backbone

    model, weights, img_size = BACKBONE
    info = load_backbone(model, weights, img_size=img_size).info
    classes = [f"class-{i}" for i in range(5)]
    return {f"task-{i:02d}": prompt_bytes(info, classes=classes, pool=4, seed=i) for i in range(n)}


def _classify_count(replica: str) -> float:
    """This replica's lpt_requests_total for successful classifies, read from its own /metrics."""
    text = httpx.get(f"http://{replica}/metrics", timeout=5.0).text
    return sum(
        (
            s.value
            for s in metric_samples(text)
            if s.name == "lpt_requests_total" and s.labels.get("status") == "200" and "classify" in s.labels["endpoint"]
        ),
        0.0,
    )


def _prometheus_query(base: str, query: str) -> list[dict]:
    response = httpx.get(f"http://{base}/api/v1/query", params={"query": query}, timeout=5.0)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


# -- the test ----------------------------------------------------------------------------------------


def test_topology_routes_each_task_to_one_replica_and_prometheus_scrapes_both(topology: Topology):
    t = topology
    first = t.replicas["service"]
    proxy = f"http://{t.proxy}"

    # The image's health check script passes against a live replica.
    env = {**os.environ, "LPT_PORT": first.rsplit(":", 1)[1]}
    assert subprocess.run([sys.executable, str(cfg.HEALTHCHECK)], env=env, timeout=30).returncode == 0

    # The proxy forwards non-classify routes to any replica; /metrics stays internal.
    backbone = httpx.get(f"{proxy}/v1/backbone", headers=AUTH, timeout=10.0)
    assert backbone.status_code == 200, backbone.text
    assert httpx.get(f"{proxy}/metrics", timeout=10.0).status_code == 404

    # Upload every task through one replica (not the proxy).
    sets = _prompt_sets(NUM_TASKS + 1)
    via_proxy, via_proxy_data = sets.popitem()
    with httpx.Client(timeout=30.0, headers=AUTH) as client:
        for task, data in sets.items():
            r = client.post(
                f"http://{first}/v1/prompts",
                params={"task": task},
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert r.status_code == 201, r.text
            assert r.json()["version"] >= 1

        # Classify every task through nginx; the replica that answers is the same every time.
        image = image_bytes(seed=0, size=(48, 48))
        owner: dict[str, str] = {}
        for task in sets:
            before = {n: _classify_count(a) for n, a in t.replicas.items()}
            seen_headers = set()
            for _ in range(CLASSIFY_REPEATS):
                r = client.post(f"{proxy}/v1/classify", params={"task": task, "top_k": 3}, content=image)
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["task"] == task and len(body["predictions"]) == 3
                scores = [p["score"] for p in body["predictions"]]
                assert scores == sorted(scores, reverse=True)
                if "x-lpt-replica" in r.headers:
                    seen_headers.add(r.headers["x-lpt-replica"])
            after = {n: _classify_count(a) for n, a in t.replicas.items()}
            delta = {n: after[n] - before[n] for n in t.replicas}
            served = [n for n, d in delta.items() if d > 0]
            assert len(served) == 1 and delta[served[0]] == CLASSIFY_REPEATS, f"{task} spread over replicas: {delta}"
            owner[task] = served[0]
            if seen_headers:
                assert seen_headers == {t.replica_ids[served[0]]}, (task, seen_headers, served)

        # Later, the same tasks still land on the same replicas.
        for task in list(sets)[:8]:
            before = _classify_count(t.replicas[owner[task]])
            r = client.post(f"{proxy}/v1/classify", params={"task": task}, content=image)
            assert r.status_code == 200, r.text
            assert _classify_count(t.replicas[owner[task]]) == before + 1, task

        # Both replicas own tasks: the replica that got no upload served from the shared store.
        assert set(owner.values()) == set(t.replicas), f"all tasks hashed to one replica: {owner}"

        # Uploads may go through the proxy to any replica; the task is then classifiable through it.
        r = client.post(f"{proxy}/v1/prompts", params={"task": via_proxy}, content=via_proxy_data)
        assert r.status_code == 201, r.text
        r = client.post(f"{proxy}/v1/classify", params={"task": via_proxy}, content=image)
        assert r.status_code == 200, r.text

    # Prometheus, with the compose scrape config, scrapes lpt_requests_total from both replicas.
    expected = set(t.replicas)
    found: dict[str, float] = {}

    def scraped_both() -> bool:
        query = 'sum by (replica) (lpt_requests_total{job="lpt-serve", endpoint="/v1/classify", status="200"})'
        found.clear()
        found.update(
            {r["metric"].get("replica", ""): float(r["value"][1]) for r in _prometheus_query(t.prometheus, query)}
        )
        classified = {n: sum(1 for o in owner.values() if o == n) * CLASSIFY_REPEATS for n in expected}
        return set(found) == expected and all(found[n] >= classified[n] for n in expected)

    wait_while_alive(f"Prometheus to scrape {sorted(expected)}", scraped_both, SCRAPE_TIMEOUT, t.procs, interval=0.5)
    up = _prometheus_query(t.prometheus, 'up{job="lpt-serve"}')
    assert {r["metric"]["replica"]: r["value"][1] for r in up} == dict.fromkeys(expected, "1")
