"""Static checks of the compose files: what `docker compose up` runs on a fresh clone (GPU: docker-compose.yml
plus docker-compose.override.yml) and with `-f docker-compose.yml` (CPU), checked without a Docker daemon.

docker-compose 1.29 and the compose-spec schema it ships are the real ones; a check that needs them skips
when they are missing on a developer's machine and fails in CI (``CI`` set), which installs them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy import configs as cfg

COMPOSE_SPEC_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")
ALL_SERVICES = {"secrets", "redis", "service", "prometheus", "grafana", "trainer", "service-2", "nginx"}
# The two documented commands: `docker compose up` (the override is read automatically) and the CPU one.
STACKS = {"gpu": [], "cpu": ["-f", "docker-compose.yml"]}
GPU_SERVICES = ("service", "service-2", "trainer")
# The secrets volumes, one per consumer (docker/lpt_secrets.py writes a folder in each).
SECRET_FOLDERS = ("lpt", "trainer", "redis", "grafana")

secrets_mod = cfg.lpt_secrets()


def _compose_config(tmp_path: Path, files: list[str], env_file: Path | None = None, fmt: str = "") -> dict:
    """`docker-compose config` of ``files`` in the repository, with no .env and no variables set."""
    exe = cfg.require_binary("docker-compose")
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
    args = [exe, "--env-file", str(env_file), *files, "--profile", "train", "--profile", "scale", "config"]
    done = cfg.run(args, env=cfg.clean_env())
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    return yaml.safe_load(done.stdout)


def _gpu_devices(svc: dict) -> list[dict]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


@pytest.mark.parametrize("stack", STACKS)
def test_compose_config_succeeds_with_no_env_file_and_no_variables(tmp_path, stack):
    doc = _compose_config(tmp_path, STACKS[stack])
    services = doc["services"]
    assert set(services) == ALL_SERVICES
    for name in GPU_SERVICES:
        svc = services[name]
        devices = _gpu_devices(svc)
        build_args = svc["build"].get("args", {})
        if stack == "gpu":
            assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
            assert svc["image"] == "lpt-serve:cuda" and build_args["BASE_IMAGE"].startswith("pytorch/pytorch:")
        else:
            assert "deploy" not in svc, f"{name}: the CPU stack must not reserve a GPU"
            assert svc["image"] == "lpt-serve:cpu" and "BASE_IMAGE" not in build_args, "CPU: the Dockerfile default"
    # Device, image and base image agree for every lpt-serve container (the secrets service shares the image).
    device = "cuda" if stack == "gpu" else "cpu"
    assert all(cfg.env_dict(services[n])["LPT_DEVICE"] == device for n in ("service", "service-2"))
    assert services["secrets"]["image"] == services["service"]["image"] == services["trainer"]["image"]
    assert services["secrets"]["build"] == services["service"]["build"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port}"
    assert "ports" not in services["redis"]


def test_env_example_works_as_dot_env(tmp_path):
    """`cp docker/env.example .env` as it ships: both stacks still validate, nothing is required."""
    for files in STACKS.values():
        doc = _compose_config(tmp_path, files, env_file=cfg.ENV_EXAMPLE)
        assert set(doc["services"]) == ALL_SERVICES


def test_compose_files_match_compose_spec_schema(tmp_path):
    """The compose spec's JSON schema, as shipped by Debian's docker-compose package (not vendored): both
    files as written, and both merged stacks as docker-compose renders them."""
    import jsonschema

    schema_path = cfg.require_file(COMPOSE_SPEC_SCHEMA, "apt-get install docker-compose")
    schema = json.loads(schema_path.read_text())
    assert "2019-09" in schema["$schema"]
    validator_cls = jsonschema.Draft201909Validator
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    docs = {"docker-compose.yml": cfg.compose(), "docker-compose.override.yml": cfg.compose_gpu_override()}
    docs |= {f"{stack} stack": _compose_config(tmp_path, files) for stack, files in STACKS.items()}
    for name, doc in docs.items():
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, (
            name + ":\n" + "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
        )
    # The schema is strict: an unknown key is an error, so this check can fail.
    broken = cfg.compose()
    broken["services"]["service"]["restrt"] = "always"
    assert list(validator.iter_errors(broken))


def test_no_secret_is_a_variable_or_in_the_repository():
    """Compose reads no secret variable (a container's environment shows in `docker inspect`); the user's
    secrets are files in docker/secrets/, which git and the Docker build context leave out."""
    text = cfg.COMPOSE_FILE.read_text() + cfg.COMPOSE_GPU_FILE.read_text()
    assert not cfg.compose_variables() & set(cfg.SECRET_VARIABLES)
    assert not re.search(r"^(" + "|".join(cfg.SECRET_VARIABLES) + r")=", cfg.ENV_EXAMPLE.read_text(), flags=re.M)
    assert "--requirepass" not in text, "a password on a command line is visible in ps and docker inspect"
    assert "/.env" in (cfg.REPO / ".gitignore").read_text().split()
    git = cfg.require_binary("git")
    if cfg.run([git, "rev-parse", "--is-inside-work-tree"]).returncode != 0:
        pytest.skip("not a git checkout: what git ignores cannot be checked")
    chosen = cfg.REPO / secrets_mod.CHOSEN_DIR
    names = ["api-keys", "redis-password", "grafana-admin-password", "anything"]
    ignored = cfg.run([git, "check-ignore", "--no-index", *(f"{secrets_mod.CHOSEN_DIR}/{n}" for n in names)])
    assert ignored.stdout.split() == [f"{secrets_mod.CHOSEN_DIR}/{n}" for n in names], ignored.stderr
    kept = cfg.run([git, "check-ignore", "--no-index", f"{secrets_mod.CHOSEN_DIR}/README.md"])
    assert kept.returncode == 1, "docker/secrets/README.md is tracked"
    assert (chosen / "README.md").is_file() and (chosen / ".gitignore").is_file()
    assert secrets_mod.CHOSEN_DIR in cfg.DOCKERIGNORE.read_text().split()


@pytest.mark.parametrize("stack", STACKS)
def test_no_secret_travels_in_an_environment_even_when_dot_env_sets_one(tmp_path, stack):
    """The rendered stack with every secret variable set in .env: none reaches a container, by name or value."""
    values = {name: f"{name.lower()}-0123456789abcdef" for name in cfg.SECRET_VARIABLES}
    env_file = tmp_path / "secrets.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    doc = _compose_config(tmp_path, STACKS[stack], env_file=env_file)
    for name, svc in doc["services"].items():
        assert not set(cfg.env_dict(svc)) & set(values), f"{name} gets a secret variable"
    rendered = yaml.safe_dump(doc)
    assert not [v for v in values.values() if v in rendered]
    assert "environment" not in doc["services"]["secrets"]


def test_each_container_mounts_only_the_secrets_it_reads(tmp_path):
    """The generated secrets, seen through each service's mounts: the replicas get the Redis password and the keys
    file (no admin key), the trainer the admin key, Redis its config, Grafana its password. Only the secrets
    service mounts the project directory (for docker/secrets/), read-only."""
    root = tmp_path / "run"
    secrets_mod.init(root, tmp_path / "nothing-chosen")
    reads = {
        "service": {"lpt/api-keys", "lpt/redis-password"},
        "trainer": {"trainer/admin-key"},
        "redis": {"redis/redis.conf", "redis/password"},
        "grafana": {"grafana/admin-password"},
    }
    reads["service-2"] = reads["service"]
    services = cfg.compose()["services"]
    for name, svc in services.items():
        if name == "secrets":
            continue
        seen = set()
        for volume in svc.get("volumes", []):
            source, target, *mode = volume.split(":")
            if not target.startswith(secrets_mod.DEFAULT_DIR + "/"):
                continue
            folder = target.removeprefix(secrets_mod.DEFAULT_DIR + "/")
            assert mode == ["ro"] and source == f"{folder}-secrets", f"{name}: {volume}"
            seen |= {f"{folder}/{p.name}" for p in (root / folder).iterdir()}
        assert seen == reads.get(name, set()), name
    secrets = services["secrets"]
    project = [v for svc in services.values() for v in svc.get("volumes", []) if v.split(":")[0] in (".", "./")]
    assert project == [f".:{secrets_mod.DEFAULT_PROJECT_DIR}:ro"] and project[0] in secrets["volumes"]
    folders = {p.name for p in root.iterdir()}
    assert {v for v in secrets["volumes"] if v != project[0]} == {
        f"{f}-secrets:{secrets_mod.DEFAULT_DIR}/{f}" for f in folders
    }, "the secrets service writes every secrets volume"


def test_env_example_lists_exactly_the_variables_compose_reads():
    defined = re.findall(r"^([A-Z0-9_]+)=", cfg.ENV_EXAMPLE.read_text(), flags=re.M)
    assert len(defined) == len(set(defined)), "a variable is listed twice"
    read = cfg.compose_variables()
    assert read - set(defined) == set(), "compose reads variables env.example does not list"
    assert set(defined) - read == set(), "env.example lists variables compose never reads"


def test_compose_topology():
    doc = cfg.compose()
    services = doc["services"]
    default = {name for name, svc in services.items() if not svc.get("profiles")}
    assert default == {"secrets", "redis", "service", "prometheus", "grafana"}
    assert services["trainer"]["profiles"] == ["train"]
    assert services["nginx"]["profiles"] == ["scale"]
    assert services["service-2"]["profiles"] == ["scale"]

    # Secrets: one-shot, no network, no environment; every consumer waits for it and mounts only its own
    # volume, read-only (test_each_container_mounts_only_the_secrets_it_reads).
    secrets = services["secrets"]
    assert secrets["network_mode"] == "none" and secrets["restart"] == "no" and secrets["command"] == ["init"]
    assert secrets["entrypoint"] == ["python", "/usr/local/lib/lpt-secrets.py"]
    assert "environment" not in secrets and "env_file" not in secrets
    mounts = {v.split(":")[0]: v.split(":")[1] for v in secrets["volumes"]}
    assert mounts == {".": "/run/lpt-project"} | {f"{k}-secrets": f"/run/lpt-secrets/{k}" for k in SECRET_FOLDERS}
    for name in ("redis", "grafana"):
        assert services[name]["depends_on"]["secrets"]["condition"] == "service_completed_successfully"
        assert f"{name}-secrets:/run/lpt-secrets/{name}:ro" in services[name]["volumes"]

    # Redis: AOF on, password from the secrets volume, not published, health-checked, on a volume.
    redis = services["redis"]
    command = redis["command"]
    assert command[:2] == ["redis-server", "/run/lpt-secrets/redis/redis.conf"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] in ("always", "everysec")
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "ports" not in redis, "Redis must not be published to the host"
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert "/run/lpt-secrets/redis/password" in " ".join(redis["healthcheck"]["test"])
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])

    # Every lpt-serve replica: healthy Redis first, config by environment, secrets by the entrypoint, its own id.
    replicas = cfg.lpt_replicas(doc)
    assert replicas[:2] == ["service", "service-2"], replicas
    ids = set()
    for name in replicas:
        svc = services[name]
        env = cfg.env_dict(svc)
        ids.add(env["LPT_REPLICA_ID"])
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["entrypoint"] == ["python", "/usr/local/lib/lpt-secrets.py", "exec"]
        assert svc["command"] == ["lpt-serve"]
        assert env["LPT_STORE"] == "redis://redis:6379/0", "the entrypoint adds the password"
        assert "LPT_API_KEYS" not in env, "keys come from the secrets volume"
        assert "lpt-secrets:/run/lpt-secrets/lpt:ro" in svc["volumes"]
        assert env["LPT_HOST"] == "0.0.0.0" and env["LPT_PORT"] == "8000"
        assert any(v.startswith("hub-cache:/home/lpt/.cache/huggingface") for v in svc["volumes"])
        assert any(v.endswith(":/weights:ro") for v in svc["volumes"])
        assert "lpt-healthcheck.py" in " ".join(svc["healthcheck"]["test"])
        # Docker's SIGKILL must come after the service's own graceful shutdown.
        assert _seconds(svc["stop_grace_period"]) > float(env["LPT_SHUTDOWN_TIMEOUT"])
    assert len(ids) == len(replicas), "each replica needs its own LPT_REPLICA_ID"

    # The first replica publishes the ports it listens on, HTTP and gRPC, on one bind address; service-2 is reached
    # through nginx (HTTP only).
    service_env = cfg.env_dict(services["service"])
    published = [str(p).split(":") for p in services["service"]["ports"]]
    assert {container: host for _, host, container in published} == {
        service_env["LPT_PORT"]: "8000",
        service_env["LPT_GRPC_PORT"]: "8001",
    }
    assert len({bind for bind, _, _ in published}) == 1
    assert "ports" not in services["service-2"]

    # Published on loopback only, by default; /metrics never leaves the host.
    for name, svc in services.items():
        assert all(str(p).startswith("127.0.0.1:") for p in svc.get("ports", [])), name
    grafana = cfg.env_dict(services["grafana"])
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/lpt-secrets/grafana/admin-password"

    # Trainer: one-shot, same image, pushes with the admin key (entrypoint) once the service is healthy.
    trainer = services["trainer"]
    assert "trainer-secrets:/run/lpt-secrets/trainer:ro" in trainer["volumes"]
    cmd = trainer["command"]
    assert cmd[0] == "lpt-train" and trainer["restart"] == "no"
    assert trainer["entrypoint"] == services["service"]["entrypoint"]
    assert cmd[cmd.index("--push") + 1] == "http://service:8000"
    for flag in ("--train", "--val", "--backbone", "--backbone-weights", "--out", "--report", "--task"):
        assert flag in cmd, flag
    assert "--api-key" not in cmd and "--device" not in cmd, "key from LPT_API_KEY, device from the container"
    assert trainer["image"] == services["service"]["image"]
    assert trainer["depends_on"]["service"]["condition"] == "service_healthy"

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


def test_gpu_override_gives_each_container_its_gpu():
    override = cfg.compose_gpu_override({"LPT_GPU": "3", "LPT_GPU_2": "4", "LPT_TRAIN_GPU": "5"})["services"]
    assert set(override) == {"secrets", *GPU_SERVICES}
    expected = {"service": "3", "service-2": "4", "trainer": "5"}
    for name, gpu in expected.items():
        assert [d["device_ids"] for d in _gpu_devices(override[name])] == [[gpu]], name
    assert cfg.compose_gpu_override()["services"]["service-2"]["deploy"]["resources"]["reservations"]["devices"][0][
        "device_ids"
    ] == ["1"]


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", str(duration))
    assert m, duration
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)
