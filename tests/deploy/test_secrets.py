"""docker/lpt_secrets.py, the compose stack's secrets: generated per install, kept across restarts, chosen in
docker/secrets/ files (never in variables: a secret variable is refused), refused when guessable, written so each
container gets only what it reads, and handed to Redis and lpt-serve in a form they accept (a real redis-server
reads the generated redis.conf; redis-py connects with the URL the entrypoint builds; the real app rotates keys
when the keys file is edited and the secrets service runs again)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.deploy import configs as cfg
from tests.support.ports import free_port
from tests.support.service_app import make_config, serve_in_thread
from tests.support.waiting import wait_until

secrets_mod = cfg.lpt_secrets()
# What each container reads, by the volume folder it mounts.
SERVICE_FILES = ("lpt/api-keys", "lpt/redis-password")
TRAINER_FILES = ("trainer/admin-key",)
REDIS_FILES = ("redis/password", "redis/redis.conf")
GRAFANA_FILES = ("grafana/admin-password",)
FILES = (*SERVICE_FILES, *TRAINER_FILES, *REDIS_FILES, *GRAFANA_FILES)

OLD = "acme-old-secret-0123456789"
NEW = "acme-new-secret-9876543210"
OTHER = "globex-secret-0123456789"


def _read(root: Path, name: str) -> str:
    return (root / name).read_text()


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _choose(chosen: Path, files: dict[str, str]) -> Path:
    """Write the user's chosen files (docker/secrets/NAME) into ``chosen``."""
    chosen.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (chosen / name).write_text(text)
    return chosen


def test_first_start_generates_distinct_secrets_per_install_and_keeps_them(tmp_path):
    one, two, nothing_chosen = tmp_path / "one", tmp_path / "two", tmp_path / "chosen"
    secrets_mod.init(one, nothing_chosen)
    secrets_mod.init(two, nothing_chosen)
    assert set(_snapshot(one)) == set(FILES), "each volume holds exactly what its container reads"
    tenant, _, key = _read(one, "lpt/api-keys").strip().partition(":")
    assert tenant == "admin" and len(key) == 48 and _read(one, "trainer/admin-key").strip() == key
    password = _read(one, "lpt/redis-password").strip()
    assert len(password) == 64 and _read(one, "redis/password").strip() == password
    assert _read(one, "redis/redis.conf") == f'requirepass "{password}"\n'
    for name in FILES:
        assert _read(one, name) != _read(two, name), f"{name} is the same for two installs"
    # The service's and the trainer's files are private to uid 10001; Redis's and Grafana's readable by their user.
    for name in (*SERVICE_FILES, *TRAINER_FILES):
        assert (one / name).stat().st_mode & 0o777 == 0o400, name
    assert (one / "redis/redis.conf").stat().st_mode & 0o777 == 0o444
    # A restart keeps everything (Redis's data and every client keep working).
    before = _snapshot(one)
    secrets_mod.init(one, nothing_chosen)
    assert _snapshot(one) == before


def test_chosen_files_win_and_what_is_not_chosen_is_kept(tmp_path):
    root, chosen = tmp_path / "run", tmp_path / "chosen"
    secrets_mod.init(root, chosen)
    generated = _snapshot(root)
    # Keys only: several per tenant (rotation), comments and blank lines skipped, order kept.
    _choose(chosen, {"api-keys": f"# acme rotates\nacme:{OLD}\n\nglobex:{OTHER}\nacme:{NEW}\n"})
    secrets_mod.init(root, chosen)
    assert _read(root, "lpt/api-keys") == f"acme:{OLD}\nacme:{NEW}\nglobex:{OTHER}\n"
    assert _read(root, "trainer/admin-key") == f"{OLD}\n", "the first key of the first tenant"
    for name in (*REDIS_FILES, "lpt/redis-password", *GRAFANA_FILES):
        assert _read(root, name) == generated[name], f"{name}: not chosen, so kept"
    # Passwords too.
    redis_password, grafana_password = "p@ss:w/rd#0123456789", "g" + "0123" * 5
    _choose(chosen, {"redis-password": redis_password + "\n", "grafana-admin-password": grafana_password})
    secrets_mod.init(root, chosen)
    assert _read(root, "lpt/redis-password").strip() == redis_password == _read(root, "redis/password").strip()
    assert _read(root, "grafana/admin-password").strip() == grafana_password
    # Deleting the files keeps the values in force (only removing the volumes generates new ones).
    chosen_state = _snapshot(root)
    shutil.rmtree(chosen)
    secrets_mod.init(root, chosen)
    assert _snapshot(root) == chosen_state


def test_an_admin_key_in_the_service_volume_is_removed(tmp_path):
    """The service never holds the admin key, even in a volume written with one."""
    secrets_mod.init(tmp_path, tmp_path / "chosen")
    (tmp_path / "lpt/admin-key").write_text("x" * 48 + "\n")
    secrets_mod.init(tmp_path, tmp_path / "chosen")
    assert set(_snapshot(tmp_path)) == set(FILES)


@pytest.mark.parametrize(
    "name,text,secret",
    [
        ("api-keys", "acme:change-me-to-a-long-random-secret\n", "change-me-to-a-long-random-secret"),
        ("api-keys", f"acme:{OLD}\nacme:tiny-one\n", "tiny-one"),
        ("api-keys", "acme\n", None),
        ("api-keys", "Not An Id:whatever-whatever-1234\n", "whatever-whatever-1234"),
        ("api-keys", "# nobody yet\n", None),
        ("redis-password", "tooshort\n", "tooshort"),
        ("redis-password", 'has"a-quote-0123456789', 'has"a-quote-0123456789'),
        ("redis-password", "two-lines-0123456789\nmore-0123456789", "two-lines-0123456789"),
        ("grafana-admin-password", "has a space 0123456789", "has a space 0123456789"),
        ("grafana-admin-password", "", None),
    ],
)
def test_guessable_or_unusable_chosen_values_are_refused_and_nothing_changes(tmp_path, name, text, secret):
    root, chosen = tmp_path / "run", tmp_path / "chosen"
    secrets_mod.init(root, chosen)
    before = _snapshot(root)
    _choose(chosen, {name: text})
    with pytest.raises(SystemExit) as refused:
        secrets_mod.init(root, chosen)
    message = str(refused.value)
    assert f"docker/secrets/{name}" in message
    assert secret is None or secret not in message, "a refusal never shows the secret"
    assert _snapshot(root) == before


@pytest.mark.parametrize("variable", cfg.SECRET_VARIABLES)
def test_a_secret_variable_is_refused_naming_the_file_to_use(tmp_path, variable):
    """A secret set the environment way would be ignored (compose passes none) or shown in `docker inspect`:
    refused, in the container's environment or in the project's .env, and nothing is written."""
    assert set(secrets_mod.SECRET_VARIABLES) == set(cfg.SECRET_VARIABLES)
    value = "acme:acme-secret-0123456789" if variable == "LPT_API_KEYS" else "p-0123456789abcdef"
    root, chosen, dot_env = tmp_path / "run", tmp_path / "chosen", tmp_path / ".env"
    where = secrets_mod.SECRET_VARIABLES[variable].split()[0]
    for env, dot_env_text in (({variable: value}, ""), ({}, f"LPT_DEMO=true\nexport {variable}='{value}' # mine\n")):
        dot_env.write_text(dot_env_text)
        with pytest.raises(SystemExit) as refused:
            secrets_mod.init(root, chosen, env, dot_env)
        message = str(refused.value)
        assert variable in message and where in message and where.startswith("docker/secrets/")
        assert (".env" in message) == bool(dot_env_text) and value not in message
        assert not root.exists(), "nothing is written"
    # Empty, commented out or unrelated: fine (a .env copied from an older env.example lists them empty).
    dot_env.write_text(f'{variable}=\n# {variable}={value}\nLPT_{variable}X={value}\n{variable}="" # unset\n')
    secrets_mod.init(root, chosen, {variable: "", "LPT_DEMO": "true"}, dot_env)
    assert set(_snapshot(root)) == set(FILES)


def test_entrypoint_environment_gives_each_container_what_its_volume_holds(tmp_path):
    root = tmp_path / "run"
    secrets_mod.init(root, _choose(tmp_path / "chosen", {"redis-password": "p@ss:w/rd#0123456789"}))
    # Each container mounts only its own folder.
    service_view, trainer_view = tmp_path / "service", tmp_path / "trainer"
    shutil.copytree(root / "lpt", service_view / "lpt")
    shutil.copytree(root / "trainer", trainer_view / "trainer")
    env = secrets_mod.service_environment(service_view, {"LPT_STORE": "redis://redis:6379/0", "OTHER": "x"})
    assert env["LPT_STORE"] == "redis://:p%40ss%3Aw%2Frd%230123456789@redis:6379/0"
    assert env["LPT_API_KEYS_FILE"] == str(service_view / "lpt/api-keys") and env["OTHER"] == "x"
    assert "LPT_API_KEY" not in env, "the service has no admin key"
    env = secrets_mod.service_environment(trainer_view, {"HF_HUB_OFFLINE": "0"})
    assert env == {"HF_HUB_OFFLINE": "0", "LPT_API_KEY": _read(root, "trainer/admin-key").strip()}
    # What the operator set explicitly is left alone.
    given = {"LPT_STORE": "redis://:own@elsewhere:6379/0", "LPT_API_KEYS": f"acme:{OLD}", "LPT_API_KEY": OLD}
    assert secrets_mod.service_environment(root, given) == given
    assert secrets_mod.service_environment(root, {"LPT_STORE": "/data/store"})["LPT_STORE"] == "/data/store"


def test_redis_accepts_the_generated_config_and_the_entrypoint_url(tmp_path):
    exe = cfg.require_binary("redis-server")
    root = tmp_path / "run"
    secrets_mod.init(root, _choose(tmp_path / "chosen", {"redis-password": "p@ss:w/rd#0123456789!~\n"}))
    port = free_port()
    conf = str(root / "redis/redis.conf")
    proc = subprocess.Popen(
        [exe, conf, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = secrets_mod.service_environment(root, {"LPT_STORE": f"redis://127.0.0.1:{port}/0"})["LPT_STORE"]
        client = redis.Redis.from_url(url, socket_timeout=2)
        what = "redis-server to start with the generated config and answer PING"
        wait_until(client.ping, 10, what, interval=0.1, retry_on=(redis.ConnectionError,))
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping()
    finally:
        proc.kill()
        proc.wait()


def _script_env(root: Path, project: Path, **extra: str) -> dict[str, str]:
    """The secrets container's environment: where its volumes and the project directory are mounted."""
    return cfg.clean_env(
        {"LPT_SECRETS_DIR": str(root), "LPT_PROJECT_DIR": str(project), "PYTHONPATH": str(cfg.REPO), **extra}
    )


SCRIPT = [sys.executable, str(cfg.SECRETS_SCRIPT)]


def test_script_commands(tmp_path):
    """The commands compose runs: init (reading the project's docker/secrets/), admin-key, exec."""
    root, project = tmp_path / "run", tmp_path / "project"
    _choose(project / "docker/secrets", {"api-keys": f"acme:{OLD}\nglobex:{OTHER}\n"})
    env = _script_env(root, project)
    done = cfg.run([*SCRIPT, "init"], env=env)
    assert done.returncode == 0, done.stderr
    assert OLD not in done.stdout + done.stderr, "init must not print a secret"
    assert "acme, globex" in done.stdout
    shown = cfg.run([*SCRIPT, "admin-key"], env=env)
    assert shown.returncode == 0 and shown.stdout.strip() == OLD
    printed = cfg.run([*SCRIPT, "exec", "env"], env={**env, "LPT_STORE": "redis://redis:6379/0"})
    lines = dict(line.partition("=")[::2] for line in printed.stdout.splitlines())
    assert lines["LPT_API_KEYS_FILE"] == str(root / "lpt/api-keys") and lines["LPT_API_KEY"] == OLD
    assert lines["LPT_STORE"].startswith("redis://:") and lines["LPT_STORE"].endswith("@redis:6379/0")
    assert cfg.run([*SCRIPT], env=env).returncode == 2


def test_script_refuses_a_secret_variable_in_its_environment_or_in_dot_env(tmp_path):
    root, project = tmp_path / "run", tmp_path / "project"
    project.mkdir()
    value = "p-0123456789abcdef"
    done = cfg.run([*SCRIPT, "init"], env=_script_env(root, project, REDIS_PASSWORD=value))
    assert done.returncode == 1 and "docker/secrets/redis-password" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and value not in done.stdout + done.stderr
    (project / ".env").write_text(f"LPT_API_KEYS=acme:{OLD}\nGRAFANA_ADMIN_PASSWORD={value}\n")
    done = cfg.run([*SCRIPT, "init"], env=_script_env(root, project))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    for variable in ("LPT_API_KEYS", "GRAFANA_ADMIN_PASSWORD"):
        assert f"{variable} is set in .env" in done.stderr
    assert "docker/secrets/api-keys" in done.stderr and "docker/secrets/grafana-admin-password" in done.stderr
    assert OLD not in done.stderr and value not in done.stderr and not root.exists()


def test_keys_rotate_by_editing_the_file_and_running_secrets_again_without_a_restart(backbone, tmp_path):
    """`docker compose run --rm secrets` after an edit of docker/secrets/api-keys: the running service (the real
    app, configured with the keys file the entrypoint points it at) takes the keys within its poll interval."""
    root, project = tmp_path / "run", tmp_path / "project"
    chosen = project / "docker/secrets"
    env = _script_env(root, project)

    def secrets_run(keys: str) -> int:
        _choose(chosen, {"api-keys": keys})
        return cfg.run([*SCRIPT, "init"], env=env).returncode

    assert secrets_run(f"acme:{OLD}\n") == 0
    keys_file = secrets_mod.service_environment(root, {})["LPT_API_KEYS_FILE"]
    config = make_config(tmp_path, api_keys_file=Path(keys_file))
    with serve_in_thread(config, backbone) as served:

        def status(secret: str) -> int:
            headers = {"Authorization": f"Bearer {secret}"}
            return served.get("/v1/prompts", headers=headers).status_code

        assert (status(OLD), status(NEW)) == (200, 401)
        assert secrets_run(f"acme:{OLD}\nacme:{NEW}\n") == 0  # overlap: clients move to the new key
        wait_until(lambda: status(NEW) == 200, 15, "the new key to be accepted without a restart")
        assert status(OLD) == 200
        assert secrets_run(f"acme:{NEW}\n") == 0  # the old key retires
        wait_until(lambda: status(OLD) == 401, 15, "the old key to be refused without a restart")
        # A guessable key stops at the secrets service: the service's file and keys stay as they are.
        assert secrets_run(f"acme:{NEW}\nacme:changeme-changeme-0000\n") == 1
        assert _read(root, "lpt/api-keys") == f"acme:{NEW}\n" and status(NEW) == 200
