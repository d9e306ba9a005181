"""The KServe examples (docs/kserve/*.yaml): a ServingRuntime that speaks the Open Inference Protocol on the ports
lpt-serve listens on, probed on the protocol's health paths, and InferenceServices that select it."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.settings import ServiceConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DOCS / "kserve" / name).read_text()) if d]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_the_runtime_serves_the_protocol_on_the_ports_it_names():
    (runtime,) = documents("servingruntime.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    spec = runtime["spec"]
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    (container,) = spec["containers"]
    env = env_of(container)
    assert set(env) <= {f.upper() for f in ("LPT_" + n for n in ServiceConfig.__dataclass_fields__)} | {"LPT_STORE"}
    http_port = int(env["LPT_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [http_port]
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": http_port}
    assert env["LPT_HOST"] == "0.0.0.0"
    assert int(env["LPT_GRPC_PORT"]) not in (0, http_port)


def test_the_inference_services_select_the_runtime_over_rest_and_grpc():
    (runtime,) = documents("servingruntime.yaml")
    grpc_port = int(env_of(runtime["spec"]["containers"][0])["LPT_GRPC_PORT"])
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    services = documents("inferenceservice.yaml")
    assert [s["kind"] for s in services] == ["InferenceService", "InferenceService"]
    protocols = {}
    for service in services:
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] in formats
        assert "storageUri" not in model  # tasks come from the store, nothing is downloaded
        protocols[model["protocolVersion"]] = model.get("ports", [])
    assert protocols["v2"] == []
    assert protocols["grpc-v2"] == [{"name": "h2c", "containerPort": grpc_port, "protocol": "TCP"}]
