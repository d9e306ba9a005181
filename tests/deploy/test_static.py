"""Static checks of the deployment files: what `docker compose up` would run, checked without Docker.

Each external tool (docker-compose, hadolint, promtool, nginx) is the real one; a test that needs a tool
skips when it is missing on a developer's machine and fails in CI (``CI`` set), which installs them all.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.deploy import configs as cfg

# Local stand-ins for the compose replicas (configs are rendered and checked, nothing connects to them).
LOCAL = {"service": "127.0.0.1:18001", "service-2": "127.0.0.1:18002"}
COMPOSE_SPEC_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cfg.REPO)


def _compose_cli_env(extra: dict[str, str]) -> dict[str, str]:
    """A clean environment, so neither the developer's LPT_* variables nor a .env leak into the check."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **extra}


# -- docker-compose.yml ------------------------------------------------------------------------------


def test_compose_file_validates_with_docker_compose(tmp_path):
    exe = cfg.require_binary("docker-compose")
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    args = [exe, "--env-file", str(empty_env_file), "-f", str(cfg.COMPOSE_FILE), "--project-directory", str(cfg.REPO)]
    profiles = ["--profile", "train", "--profile", "scale"]
    done = _run([*args, *profiles, "config", "-q"], env=_compose_cli_env(cfg.REQUIRED_ENV))
    assert done.returncode == 0, done.stderr
    listed = _run([*args, *profiles, "config", "--services"], env=_compose_cli_env(cfg.REQUIRED_ENV))
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == {"redis", "service", "prometheus", "grafana", "trainer", "service-2", "nginx"}

    # Secrets have no defaults: without them compose refuses, naming the variable.
    for name in cfg.REQUIRED_ENV:
        env = {k: v for k, v in cfg.REQUIRED_ENV.items() if k != name}
        refused = _run([*args, "config", "-q"], env=_compose_cli_env(env))
        assert refused.returncode != 0, f"compose started without {name}"
        assert name in refused.stderr + refused.stdout


def test_compose_file_matches_compose_spec_schema():
    """The compose spec's JSON schema, as shipped by Debian's docker-compose package (not vendored)."""
    import jsonschema

    schema_path = cfg.require_file(COMPOSE_SPEC_SCHEMA, "apt-get install docker-compose")
    schema = json.loads(schema_path.read_text())
    assert "2019-09" in schema["$schema"]
    validator_cls = jsonschema.Draft201909Validator
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(cfg.compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # The schema is strict: an unknown key is an error, so this check can fail.
    broken = cfg.compose()
    broken["services"]["service"]["restrt"] = "always"
    assert list(validator_cls(schema).iter_errors(broken))


def test_required_secrets_have_no_defaults():
    for name in cfg.REQUIRED_ENV:
        env = {k: v for k, v in cfg.REQUIRED_ENV.items() if k != name}
        with pytest.raises(cfg.MissingVariable, match=name):
            cfg.compose(env)


def _gpu_devices(svc: dict) -> list[dict]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _publishes(svc: dict) -> list[str]:
    return [str(p) for p in svc.get("ports", [])]


def test_compose_topology():
    doc = cfg.compose()
    services = doc["services"]
    default = {name for name, svc in services.items() if not svc.get("profiles")}
    assert default == {"redis", "service", "prometheus", "grafana"}
    assert services["trainer"]["profiles"] == ["train"]
    assert services["nginx"]["profiles"] == ["scale"]
    assert services["service-2"]["profiles"] == ["scale"]

    # Redis: AOF on, password, not published, health-checked, on a volume.
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] in ("always", "everysec")
    assert command[command.index("--requirepass") + 1] == cfg.REQUIRED_ENV["REDIS_PASSWORD"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "ports" not in redis, "Redis must not be published to the host"
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])

    # Every lpt-serve replica: GPU, healthy Redis first, config by environment, hub cache volume, its own id.
    replicas = cfg.lpt_replicas(doc)
    assert replicas[:2] == ["service", "service-2"], replicas
    ids = set()
    for name in replicas:
        svc = services[name]
        env = cfg.env_dict(svc)
        ids.add(env["LPT_REPLICA_ID"])
        gpus = _gpu_devices(svc)
        assert gpus and all("gpu" in d["capabilities"] for d in gpus), f"{name}: no GPU reservation"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert env["LPT_STORE"] == f"redis://:{cfg.REQUIRED_ENV['REDIS_PASSWORD']}@redis:6379/0"
        assert env["LPT_API_KEYS"] == cfg.REQUIRED_ENV["LPT_API_KEYS"]
        assert env["LPT_HOST"] == "0.0.0.0" and env["LPT_PORT"] == "8000"
        assert any(v.startswith("hub-cache:/home/lpt/.cache/huggingface") for v in svc["volumes"])
        assert any(v.endswith(":/weights:ro") for v in svc["volumes"])
        assert "lpt-healthcheck.py" in " ".join(svc["healthcheck"]["test"])
        # Docker's SIGKILL must come after the service's own graceful shutdown.
        assert _seconds(svc["stop_grace_period"]) > float(env["LPT_SHUTDOWN_TIMEOUT"])
        # The GPU service is reached by the user on loopback only, by default.
        assert all(p.startswith("127.0.0.1:") for p in _publishes(svc))
    assert len(ids) == len(replicas), "each replica needs its own LPT_REPLICA_ID"

    # Monitoring is published on loopback only; /metrics never leaves the host.
    for name in ("prometheus", "grafana", "nginx"):
        assert all(p.startswith("127.0.0.1:") for p in _publishes(services[name])), name
    assert cfg.env_dict(services["grafana"])["GF_AUTH_ANONYMOUS_ENABLED"] == "false"

    # Trainer: one-shot, same image, pushes to the service once it is healthy.
    trainer = services["trainer"]
    cmd = trainer["command"]
    assert cmd[0] == "lpt-train" and trainer["restart"] == "no"
    assert cmd[cmd.index("--push") + 1] == "http://service:8000"
    for flag in ("--train", "--val", "--backbone", "--backbone-weights", "--out", "--report", "--task", "--api-key"):
        assert flag in cmd, flag
    assert trainer["image"] == services["service"]["image"]
    assert trainer["depends_on"]["service"]["condition"] == "service_healthy"
    assert _gpu_devices(trainer)

    # nginx fronts every replica, after they are healthy.
    nginx = services["nginx"]
    assert set(nginx["depends_on"]) == set(replicas)
    upstream = [h.split(":")[0] for h in cfg.upstream_hosts(cfg.nginx_env(doc)["LPT_UPSTREAM_SERVERS"])]
    assert sorted(upstream) == sorted(replicas)

    # Files the containers mount exist in the repository.
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("./docker"):
                assert (cfg.REPO / source).exists(), f"{name} mounts missing {source}"


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", str(duration))
    assert m, duration
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_env_example_names_every_required_variable():
    text = cfg.ENV_EXAMPLE.read_text()
    defined = set(re.findall(r"^([A-Z0-9_]+)=", text, flags=re.M))
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", cfg.COMPOSE_FILE.read_text()))
    assert set(cfg.REQUIRED_ENV) <= defined
    assert not (defined - used - {"LPT_API_KEY"}), f"env.example sets variables compose never reads: {defined - used}"


# -- Dockerfile --------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    exe = cfg.require_binary("hadolint")
    done = _run([exe, "--no-color", str(cfg.DOCKERFILE)])
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
    froms = [rest for word, rest in ins if word == "FROM"]
    assert any(f.startswith("${CUDA_BASE}") for f in froms) and any(f.startswith("${CPU_BASE}") for f in froms)
    args = " ".join(rest for word, rest in ins if word == "ARG")
    assert "VARIANT=cuda" in args and "pytorch/pytorch:" in args and "runtime" in args
    assert "download.pytorch.org/whl/cpu" in args, "CPU variant installs torch's CPU wheels"
    final = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    assert ins[final][1].startswith("base-${VARIANT}")

    users = [rest for word, rest in ins[final:] if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage must run as a non-root user"
    assert users[-1].split(":")[0].isdigit(), "numeric USER, so runAsNonRoot can check it"

    health = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert len(health) == 1 and "lpt-healthcheck.py" in health[0]
    copies = " ".join(rest for word, rest in ins if word == "COPY")
    assert "docker/healthcheck.py /usr/local/lib/lpt-healthcheck.py" in copies
    # Every Python package the distribution ships is copied before `pip install .`.
    pyproject = (cfg.REPO / "pyproject.toml").read_text()
    include = re.search(r"include\s*=\s*\[([^\]]*)\]", pyproject).group(1)
    for pattern in re.findall(r'"([^"]+)"', include):
        pkg = pattern.rstrip("*")
        assert re.search(rf"(^|\s){pkg}\s", copies), f"package {pkg} is not copied into the image"
    assert "pyproject.toml" in copies and "README.md" in copies
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "pip install --no-cache-dir --constraint /opt/torch-constraints.txt ." in runs
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
    done = _run([exe, "check", "config", str(cfg.PROMETHEUS_FILE)])
    assert done.returncode == 0, done.stdout + done.stderr
    # The variant the topology test runs is valid too.
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(cfg.local_prometheus_config(LOCAL)))
    done = _run([exe, "check", "config", str(local)])
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
    done = _run([exe, "check", "rules", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr


def _exposed_series_names(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
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
    done = _run([exe, "-t", "-p", str(tmp_path), "-c", str(main)])
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
    # And it can fail: a broken directive is caught.
    snippet.write_text(snippet.read_text().replace("hash $arg_task consistent;", "hash $arg_task sometimes;"))
    assert _run([exe, "-t", "-p", str(tmp_path), "-c", str(main)]).returncode != 0
