"""The Helm chart (charts/lpt-serve) rendered and validated the way a cluster would take it, without a cluster.

- ``render()``: Helm's own engine (helm-python-sdk binds Helm's Go SDK; no helm binary, no network), the chart's
  values.schema.json included, into the list of Kubernetes objects an install would create.
- ``validate()``: built-in kinds against the Kubernetes OpenAPI schemas in strict mode (kubernetes-validate:
  unknown fields are errors, as with ``kubectl apply --validate=strict``); custom resources (ServiceMonitor,
  PrometheusRule, ScaledObject) against their CRDs' schemas vendored in ``crd_schemas/`` (README there), made
  strict the same way, with their metadata checked as Kubernetes ObjectMeta.
- Lookups on the rendered objects: by kind and name, pod specs, containers, env, label selectors.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "lpt-serve"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*.yaml"))
ALERT_TESTS = CHART_DIR / "tests" / "alerts.test.yaml"
CRD_SCHEMAS = Path(__file__).resolve().parent / "crd_schemas"

# What the tests render: a release named like the chart (full name lpt-serve) in its own namespace.
RELEASE = "lpt-serve"
NAMESPACE = "inference"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
OLDEST_KUBERNETES = "1.25"

# Custom resources: (apiVersion, kind) -> vendored schema file.
CRD_FILES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

INSTALL_HINT = "pip install -c constraints.txt -e '.[dev]'"


def require_module(name: str) -> ModuleType:
    """Import a dev dependency. Missing: a failure in CI (``CI`` set), else a skip that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed but CI must run the chart checks ({INSTALL_HINT})")
        pytest.skip(f"{name} is not installed ({INSTALL_HINT}); CI installs it and fails without it")


# -- Rendering ---------------------------------------------------------------------------------------


def load_values(path: Path) -> dict[str, Any]:
    """A values file as a dict (an empty file is no values)."""
    return yaml.safe_load(path.read_text()) or {}


@functools.lru_cache(maxsize=32)
def _render_cached(values_json: str) -> tuple[tuple[str, str], ...]:
    helm = require_module("helm_python")
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE)
    return tuple(sorted(manifests.items()))


def render_manifests(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as ``helm template`` would print them (NOTES.txt included).

    Raises:
        helm_python.HelmValuesError: the values break values.schema.json.
        helm_python.HelmRenderError: a template failed (``fail``, ``required``).
    """
    return dict(_render_cached(json.dumps(values or {}, sort_keys=True)))


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every Kubernetes object an install with ``values`` creates (a fresh copy each call)."""
    objects = []
    for path, text in render_manifests(values).items():
        if path.endswith(".yaml"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def render_file(path: Path) -> list[dict[str, Any]]:
    return render(load_values(path))


# -- Validation --------------------------------------------------------------------------------------


def _strict(node: Any) -> Any:
    """A CRD schema that refuses unknown fields, like the API server's strict field validation: every object
    schema with properties gets ``additionalProperties: false`` unless it keeps unknown fields on purpose."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.lru_cache(maxsize=8)
def _crd_validator(file_name: str) -> jsonschema.Validator:
    schema = _strict(json.loads((CRD_SCHEMAS / file_name).read_text()))
    return jsonschema.Draft7Validator(schema)


@functools.lru_cache(maxsize=4)
def _object_meta_validator(kube_version: str) -> jsonschema.Validator:
    """ObjectMeta from kubernetes-validate's strict definitions of that Kubernetes version."""
    kv = require_module("kubernetes_validate")
    minor = max(v for v in kv.utils.all_versions() if kv.utils.major_minor(v) <= kube_version)
    definitions = kv.utils.schema_contents(
        f"kubernetes-json-schema/v{minor}-local-strict/_definitions.json", kube_version
    )
    registry = Resource.from_contents(definitions) @ Registry()
    schema = {"$ref": f"{definitions['$id']}#/$defs/{OBJECT_META}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def newest_kubernetes() -> str:
    kv = require_module("kubernetes_validate")
    return kv.utils.major_minor(kv.utils.latest_version())


def validate(obj: dict[str, Any], kube_version: str) -> None:
    """Raise ``jsonschema.ValidationError`` when ``obj`` is not a valid object for that Kubernetes version.

    Args:
        obj: one rendered object.
        kube_version: "MAJOR.MINOR".
    """
    crd_file = CRD_FILES.get((obj.get("apiVersion"), obj.get("kind")))
    if crd_file:
        _crd_validator(crd_file).validate({k: v for k, v in obj.items() if k != "metadata"})
        _object_meta_validator(kube_version).validate(obj.get("metadata", {}))
        return
    kv = require_module("kubernetes_validate")
    kv.validate(obj, kube_version, strict=True)


# -- Lookups -----------------------------------------------------------------------------------------


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of that kind and name."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet")


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in all_containers(pod_spec(workload)) if c["name"] == name]
    return found


def env_of(container_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Variable name -> its entry (``value`` or ``valueFrom``); a name set twice is an error."""
    entries = container_spec.get("env", [])
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env names in {container_spec['name']}: {names}"
    return {e["name"]: e for e in entries}


def nginx_blocks(conf: str, keyword: str) -> dict[str, str]:
    """``{name: body}`` of nginx's ``keyword name { ... }`` blocks (none nests braces in the router's config)."""
    return {m.group(1): m.group(2) for m in re.finditer(rf"{keyword}\s+(\S+(?:\s+\S+)?)\s*\{{([^{{}}]*)\}}", conf)}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A matchLabels selector selects these labels."""
    return selector.items() <= labels.items()
