"""Static checks of the deployment files besides compose (tests/deploy/test_compose.py) and its secrets
(tests/deploy/test_secrets.py): the Dockerfile, Prometheus, Grafana and nginx, checked without Docker.

Each external tool (hadolint, promtool, nginx) is the real one; a test that needs a tool
skips when it is missing on a developer's machine and fails in CI (``CI`` set), which installs them all.
"""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading

import pytest
import yaml

from tests.deploy import configs as cfg
from tests.support.metrics import metric_families

# Local stand-ins for the compose replicas (configs are rendered and checked, nothing connects to them).
LOCAL = {"service": "127.0.0.1:18001", "service-2": "127.0.0.1:18002"}


# -- Dockerfile --------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    exe = cfg.require_binary("hadolint")
    done = cfg.run([exe, "--no-color", str(cfg.DOCKERFILE)])
    assert done.returncode == 0, done.stdout + done.stderr


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_contract():
    ins = _instructions(cfg.DOCKERFILE.read_text())
    # One stage from one base named by a build argument: a CPU build pulls no CUDA image, with or without
    # BuildKit (the legacy builder builds every stage of a file).
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    final = 0
    args = dict(rest.partition("=")[::2] for word, rest in ins if word == "ARG")
    assert args["BASE_IMAGE"].startswith("python:3.11-slim"), "the default build is the CPU image"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", "CPU torch wheels"
    gpu_base = cfg.compose_gpu_override()["services"]["service"]["build"]["args"]["BASE_IMAGE"]
    assert gpu_base.startswith("pytorch/pytorch:") and gpu_base.endswith("-runtime")
    assert ins[0] == ("ARG", f"BASE_IMAGE={args['BASE_IMAGE']}"), "an ARG used in FROM comes before it"
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "--find-links /tmp/wheels" in runs and "assert torch.version.cuda is None" in runs
    assert "lpt_secrets.py /usr/local/lib/lpt-secrets.py" in " ".join(rest for word, rest in ins if word == "COPY")

    users = [rest for word, rest in ins[final:] if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage must run as a non-root user"
    assert users[-1].split(":")[0].isdigit(), "numeric USER, so runAsNonRoot can check it"

    health = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert len(health) == 1 and "lpt-healthcheck.py" in health[0]
    copies = " ".join(rest for word, rest in ins if word == "COPY")
    assert "docker/healthcheck.py /usr/local/lib/lpt-healthcheck.py" in copies
    # Every Python package the distribution ships is copied before it is installed.
    pyproject = (cfg.REPO / "pyproject.toml").read_text()
    include = re.search(r"include\s*=\s*\[([^\]]*)\]", pyproject).group(1)
    for pattern in re.findall(r'"([^"]+)"', include):
        pkg = pattern.rstrip("*")
        assert re.search(rf"(^|\s){pkg}\s", copies), f"package {pkg} is not copied into the image"
    assert "pyproject.toml" in copies and "README.md" in copies
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "pip install --no-cache-dir --constraint /opt/torch-constraints.txt '.[train]'" in runs
    # The trainer runs from the same image: its console script is part of the distribution.
    assert re.search(r'^lpt-train\s*=\s*"trainer\.cli:main"', pyproject, flags=re.M)
    assert [rest for word, rest in ins][-1] == '["lpt-serve"]' and ins[-1][0] == "CMD"
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "LPT_HOST=0.0.0.0" in env and "HF_HOME=/home/lpt/.cache/huggingface" in env


def test_dockerignore_excludes_secrets_and_keeps_sources():
    import fnmatch

    patterns = [ln.strip() for ln in cfg.DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for must in (".git", ".env", "data", "runs", "**/*.safetensors"):
        assert must in patterns, must

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for pat in patterns for p in prefixes
        )

    copied = []
    for word, rest in _instructions(cfg.DOCKERFILE.read_text()):
        if word == "COPY" and not rest.startswith("--from"):
            copied += rest.split()[:-1]
    assert copied
    for src in copied:
        assert not ignored(src), f".dockerignore hides {src}, which the Dockerfile copies"
        assert (cfg.REPO / src).exists() or src == "README.md", src


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,expected", [(200, 0), (503, 1)])
def test_healthcheck_script(status, expected):
    handler = type("H", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "LPT_PORT": str(server.server_address[1])}
        done = subprocess.run([sys.executable, str(cfg.HEALTHCHECK)], env=env, capture_output=True, timeout=30)
        assert done.returncode == expected, done.stderr
    finally:
        server.shutdown()
        server.server_close()
    # Nothing listening: unhealthy, quickly.
    env = {**os.environ, "LPT_PORT": str(server.server_address[1])}
    done = subprocess.run([sys.executable, str(cfg.HEALTHCHECK)], env=env, capture_output=True, timeout=30)
    assert done.returncode == 1


# -- Prometheus --------------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool(tmp_path):
    exe = cfg.require_binary("promtool")
    done = cfg.run([exe, "check", "config", str(cfg.PROMETHEUS_FILE)])
    assert done.returncode == 0, done.stdout + done.stderr
    # The variant the topology test runs is valid too.
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(cfg.local_prometheus_config(LOCAL)))
    done = cfg.run([exe, "check", "config", str(local)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_every_replica():
    doc = cfg.compose()
    scraped = cfg.scraped_replica_names(cfg.prometheus_config())
    assert sorted(scraped) == sorted(cfg.lpt_replicas(doc))
    job = cfg.lpt_job(cfg.prometheus_config())
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert all(sd.get("port") == 8000 for sd in job.get("dns_sd_configs", []))


# -- Grafana -----------------------------------------------------------------------------------------


def test_grafana_provisioning_matches_dashboard():
    datasources = yaml.safe_load((cfg.GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((cfg.GRAFANA_DIR / "provisioning/dashboards/lpt-serve.yml").read_text())
    (provider,) = providers["providers"]
    grafana = cfg.compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts[provider["options"]["path"]] == "./docker/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"

    dash = cfg.dashboard()
    uids = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                uids.add(node["datasource"].get("uid"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash)
    assert uids == {ds["uid"]}


REQUIRED_PANEL_METRICS = {
    "throughput": "lpt_requests_total",
    "latency": "lpt_request_duration_seconds_bucket",
    "batch size": "lpt_batch_size_",
    "distinct tasks per batch": "lpt_batch_tasks_",
    "queue depth": "lpt_queue_depth",
    "cache hit rate": "lpt_prompt_cache_hits_total",
    "resident sets": "lpt_prompt_cache_resident_sets",
    "load latency": "lpt_prompt_load_duration_seconds_bucket",
}


def test_dashboard_covers_the_required_panels():
    dash = cfg.dashboard()
    queries = " ".join(cfg.dashboard_queries(dash))
    for what, metric in REQUIRED_PANEL_METRICS.items():
        assert metric in queries, f"no panel for {what}"
    for q in (0.5, 0.95, 0.99):
        assert f"histogram_quantile({q}, sum by (le) (rate(lpt_request_duration_seconds_bucket" in queries
    assert "sum by (status)" in queries, "errors by status"
    assert "lpt_prompt_cache_misses_total" in queries, "hit rate needs misses too"


def test_dashboard_promql_parses_with_promtool(tmp_path):
    exe = cfg.require_binary("promtool")
    dash = cfg.dashboard()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    rules = [{"record": f"dashboard:expr_{i}", "expr": cfg.grafana_to_promql(e)} for i, e in enumerate(exprs)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = cfg.run([exe, "check", "rules", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr


def _exposed_series_names(text: str) -> set[str]:
    names: set[str] = set()
    for fam in metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
        names.update(s.name for s in fam.samples)
    return names


def test_dashboard_metrics_exist_in_service_metrics(tmp_path):
    """Every lpt_* series the dashboard queries is exposed by the real app's /metrics."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServiceConfig

    config = ServiceConfig(
        backbone="test_vit",
        backbone_weights="random:0",
        img_size=32,
        store=str(tmp_path / "store"),
        data_dir=tmp_path,
        device="cpu",
        grpc_port=0,
    )
    with TestClient(create_app(config)) as client:
        for path in ("/healthz", "/readyz", "/v1/backbone"):
            client.get(path)
        response = client.get("/metrics")
    assert response.status_code == 200
    exposed = _exposed_series_names(response.text)
    queried = cfg.queried_metrics(cfg.dashboard())
    assert queried, "the dashboard queries no lpt_* metric"
    missing = sorted(queried - exposed)
    assert not missing, f"dashboard queries metrics the service does not expose: {missing}"
    # The dashboard's label selectors use labels the service sets.
    requests = [s for line in response.text.splitlines() if line.startswith("lpt_requests_total{") for s in [line]]
    assert requests and all('endpoint="' in s and 'status="' in s for s in requests)


# -- nginx -------------------------------------------------------------------------------------------


def test_nginx_template_variables_are_all_set_by_compose():
    placeholders = set(re.findall(r"\$\{([A-Z0-9_]+)\}", cfg.NGINX_TEMPLATE.read_text()))
    assert placeholders == set(cfg.TEMPLATE_VARS)
    assert set(cfg.nginx_env()) == placeholders
    grafted = cfg.compose()["services"]["nginx"]["volumes"]
    assert "./docker/nginx/lpt.conf.template:/etc/nginx/templates/default.conf.template:ro" in grafted


def _blocks(conf: str, keyword: str) -> dict[str, str]:
    """``{name: body}`` of ``keyword name { ... }`` blocks (no nested braces inside them here)."""
    return {m.group(1): m.group(2) for m in re.finditer(rf"{keyword}\s+(\S+(?:\s+\S+)?)\s*\{{([^{{}}]*)\}}", conf)}


def test_nginx_routes_classify_by_task_and_the_rest_anywhere():
    conf = cfg.render_nginx("127.0.0.1:18000", LOCAL)
    assert "${" not in conf
    upstreams = _blocks(conf, "upstream")
    locations = _blocks(conf, "location")
    classify = re.search(r"proxy_pass\s+http://(\w+);", locations["= /v1/classify"]).group(1)
    anywhere = re.search(r"proxy_pass\s+http://(\w+);", locations["/"]).group(1)
    assert re.search(r"^\s*hash \$arg_task consistent;", upstreams[classify], flags=re.M)
    assert "hash" not in upstreams[anywhere]
    for body in (upstreams[classify], upstreams[anywhere]):
        assert sorted(re.findall(r"server\s+(\S+)", body)) == sorted(LOCAL.values())
    assert "proxy_pass" not in locations["= /metrics"]


def test_nginx_config_passes_nginx_t(tmp_path):
    exe = cfg.require_binary("nginx")
    snippet = tmp_path / "lpt.conf"
    snippet.write_text(cfg.render_nginx("127.0.0.1:18000", LOCAL))
    main = tmp_path / "nginx.conf"
    main.write_text(cfg.nginx_main_conf(tmp_path, snippet))
    done = cfg.run([exe, "-t", "-p", str(tmp_path), "-c", str(main)])
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
    # And it can fail: a broken directive is caught.
    snippet.write_text(snippet.read_text().replace("hash $arg_task consistent;", "hash $arg_task sometimes;"))
    assert cfg.run([exe, "-t", "-p", str(tmp_path), "-c", str(main)]).returncode != 0
