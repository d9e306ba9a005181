"""docker/lpt_secrets.py, the compose stack's secrets: generated per install, kept across restarts, taken from
.env when set, refused when guessable, and handed to Redis and lpt-serve in a form they accept (a real
redis-server reads the generated redis.conf; redis-py connects with the URL the entrypoint builds)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from tests.deploy import configs as cfg
from tests.support.ports import free_port
from tests.support.waiting import wait_until

secrets_mod = cfg.lpt_secrets()
FILES = ("lpt/redis-password", "lpt/api-keys", "lpt/admin-key", "redis/redis.conf", "redis/password")


def _read(root, name: str) -> str:
    return (root / name).read_text()


def test_first_start_generates_distinct_secrets_per_install_and_keeps_them(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    secrets_mod.init(one, {})
    secrets_mod.init(two, {})
    tenant, _, key = _read(one, "lpt/api-keys").strip().partition(":")
    assert tenant == "admin" and len(key) == 48 and _read(one, "lpt/admin-key").strip() == key
    password = _read(one, "lpt/redis-password").strip()
    assert len(password) == 64 and _read(one, "redis/password").strip() == password
    assert _read(one, "redis/redis.conf") == f'requirepass "{password}"\n'
    for name in (*FILES, "grafana/admin-password"):
        assert _read(one, name) != _read(two, name), f"{name} is the same for two installs"
    # The service's files are private to it; Redis's and Grafana's readable by their container's user.
    assert (one / "lpt/api-keys").stat().st_mode & 0o777 == 0o400
    assert (one / "redis/redis.conf").stat().st_mode & 0o777 == 0o444
    # A restart keeps everything (Redis's data and every client keep working).
    before = {name: _read(one, name) for name in FILES}
    secrets_mod.init(one, {"REDIS_PASSWORD": "", "LPT_API_KEYS": ""})
    assert {name: _read(one, name) for name in FILES} == before


def test_dot_env_values_win(tmp_path):
    keys = "acme:acme-secret-0123456789,globex:globex-secret-9876543210"
    env = {"REDIS_PASSWORD": "p@ss:w/rd#0123456789", "LPT_API_KEYS": keys, "GRAFANA_ADMIN_PASSWORD": "g" + "0123" * 5}
    secrets_mod.init(tmp_path, {})
    secrets_mod.init(tmp_path, env)
    assert _read(tmp_path, "lpt/redis-password").strip() == env["REDIS_PASSWORD"]
    assert _read(tmp_path, "lpt/api-keys") == keys.replace(",", "\n") + "\n"
    assert _read(tmp_path, "lpt/admin-key").strip() == "acme-secret-0123456789"
    assert _read(tmp_path, "grafana/admin-password").strip() == env["GRAFANA_ADMIN_PASSWORD"]


@pytest.mark.parametrize(
    "env,variable",
    [
        ({"LPT_API_KEYS": "acme:change-me-to-a-long-random-secret"}, "LPT_API_KEYS"),
        ({"LPT_API_KEYS": "acme:short"}, "LPT_API_KEYS"),
        ({"LPT_API_KEYS": "acme"}, "LPT_API_KEYS"),
        ({"REDIS_PASSWORD": "tooshort"}, "REDIS_PASSWORD"),
        ({"REDIS_PASSWORD": 'has"a-quote-0123456789'}, "REDIS_PASSWORD"),
        ({"GRAFANA_ADMIN_PASSWORD": "has a space 0123456789"}, "GRAFANA_ADMIN_PASSWORD"),
    ],
)
def test_guessable_or_unusable_values_are_refused_and_nothing_changes(tmp_path, env, variable):
    secrets_mod.init(tmp_path, {})
    before = {name: _read(tmp_path, name) for name in FILES}
    with pytest.raises(SystemExit) as refused:
        secrets_mod.init(tmp_path, env)
    assert variable in str(refused.value)
    assert all(value not in str(refused.value) for value in env.values() if ":" not in value)
    assert {name: _read(tmp_path, name) for name in FILES} == before


def test_entrypoint_environment(tmp_path):
    secrets_mod.init(tmp_path, {"REDIS_PASSWORD": "p@ss:w/rd#0123456789"})
    env = secrets_mod.service_environment(tmp_path, {"LPT_STORE": "redis://redis:6379/0", "OTHER": "x"})
    assert env["LPT_STORE"] == "redis://:p%40ss%3Aw%2Frd%230123456789@redis:6379/0"
    assert env["LPT_API_KEYS_FILE"] == str(tmp_path / "lpt/api-keys")
    assert env["LPT_API_KEY"] == _read(tmp_path, "lpt/admin-key").strip() and env["OTHER"] == "x"
    # What the operator set explicitly is left alone.
    given = {"LPT_STORE": "redis://:own@elsewhere:6379/0", "LPT_API_KEYS": "acme:acme-secret-0123456789"}
    given |= {"LPT_API_KEY": "acme-secret-0123456789"}
    assert secrets_mod.service_environment(tmp_path, given) == given
    assert secrets_mod.service_environment(tmp_path, {"LPT_STORE": "/data/store"})["LPT_STORE"] == "/data/store"


def test_redis_accepts_the_generated_config_and_the_entrypoint_url(tmp_path):
    exe = cfg.require_binary("redis-server")
    secrets_mod.init(tmp_path, {"REDIS_PASSWORD": "p@ss:w/rd#0123456789!~"})
    port = free_port()
    conf = str(tmp_path / "redis/redis.conf")
    proc = subprocess.Popen(
        [exe, conf, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = secrets_mod.service_environment(tmp_path, {"LPT_STORE": f"redis://127.0.0.1:{port}/0"})["LPT_STORE"]
        client = redis.Redis.from_url(url, socket_timeout=2)
        what = "redis-server to start with the generated config and answer PING"
        wait_until(client.ping, 10, what, interval=0.1, retry_on=(redis.ConnectionError,))
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping()
    finally:
        proc.kill()
        proc.wait()


def test_script_commands(tmp_path):
    """The commands compose runs: init, admin-key, exec (the environment the command gets)."""
    env = {**cfg.clean_env({"LPT_SECRETS_DIR": str(tmp_path), "PYTHONPATH": str(cfg.REPO)})}
    script = [sys.executable, str(cfg.SECRETS_SCRIPT)]
    done = cfg.run([*script, "init"], env=env)
    assert done.returncode == 0, done.stderr
    key = _read(tmp_path, "lpt/admin-key").strip()
    assert key not in done.stdout + done.stderr, "init must not print a secret"
    shown = cfg.run([*script, "admin-key"], env=env)
    assert shown.returncode == 0 and shown.stdout.strip() == key
    printed = cfg.run([*script, "exec", "env"], env={**env, "LPT_STORE": "redis://redis:6379/0"})
    lines = dict(line.partition("=")[::2] for line in printed.stdout.splitlines())
    assert lines["LPT_API_KEYS_FILE"] == str(tmp_path / "lpt/api-keys") and lines["LPT_API_KEY"] == key
    assert lines["LPT_STORE"].startswith("redis://:") and lines["LPT_STORE"].endswith("@redis:6379/0")
    assert cfg.run([*script], env=env).returncode == 2
