"""Secrets of the compose stack: chosen in files or generated, written into volumes, handed to the containers.

    lpt-secrets.py init              the `secrets` service: take what docker/secrets/ holds, keep what exists,
                                     generate the rest
    lpt-secrets.py admin-key         print the API key of the first tenant (tenant `admin` when generated)
    lpt-secrets.py exec CMD [ARG..]  entrypoint of lpt-serve and lpt-train: read the secrets, then exec CMD

So every install gets its own Redis password, API key and Grafana password, and nothing secret sits in the
compose file, in an environment variable, in `docker inspect` or on a command line. The user's own values are
files in the project's docker/secrets/ (LPT_PROJECT_DIR, default /run/lpt-project, is the project directory,
mounted read-only into the `secrets` container only): api-keys (tenant:secret lines, several per tenant to
rotate with overlap), redis-password, grafana-admin-password; each is optional. One volume per consumer, so each
container mounts only what it reads (LPT_SECRETS_DIR, default /run/lpt-secrets):

    lpt/      redis-password, api-keys (tenant:secret lines)     service replicas (uid 10001, 0400)
    trainer/  admin-key (first key of the first tenant)          trainer, which pushes with it (uid 10001, 0400)
    redis/    redis.conf (requirepass), password                 redis (0444)
    grafana/  admin-password                                     grafana (0444)

The service reads its keys file again when it changes, so running `init` again after editing docker/secrets/api-keys
rotates keys without a restart. Standard library only, plus ``service.auth``'s key rules (the ones the service
applies), so a placeholder key stops the stack here, before anything starts.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

DEFAULT_DIR = "/run/lpt-secrets"
DEFAULT_PROJECT_DIR = "/run/lpt-project"
# The user's choices, relative to the project directory (named this way in every message).
CHOSEN_DIR = "docker/secrets"
CHOSEN_API_KEYS = "api-keys"
CHOSEN_REDIS_PASSWORD = "redis-password"
CHOSEN_GRAFANA_PASSWORD = "grafana-admin-password"
# Variables that would carry a secret through the environment (visible in `docker inspect`), refused when set in
# the container's environment or in the project's .env, each with where its value goes instead.
SECRET_VARIABLES = {
    "REDIS_PASSWORD": f"{CHOSEN_DIR}/{CHOSEN_REDIS_PASSWORD}",
    "LPT_API_KEYS": f"{CHOSEN_DIR}/{CHOSEN_API_KEYS}",
    "GRAFANA_ADMIN_PASSWORD": f"{CHOSEN_DIR}/{CHOSEN_GRAFANA_PASSWORD}",
    "LPT_API_KEY": f"{CHOSEN_DIR}/{CHOSEN_API_KEYS} (the trainer pushes with the first key of the first tenant)",
}
# The tenant of the generated key.
ADMIN_TENANT = "admin"
# The service's user in the image (docker/Dockerfile); it owns the lpt/ and trainer/ files.
SERVICE_UID = 10001
MIN_PASSWORD_CHARS = 16
# Printable ASCII without space, quotes or backslash: safe in redis.conf and, URL-quoted, in redis:// URLs.
PASSWORD_CHARS = re.compile(r"[!#-&(-\[\]-~]+")

# tenant -> its secrets, in the order of the keys file.
Keys = dict[str, tuple[str, ...]]


def dot_env_names(path: Path) -> set[str]:
    """The variables a compose ``.env`` file sets to a non-empty value (the values themselves are not kept).

    Args:
        path: the .env file; a missing one sets nothing.
    """
    if not path.is_file():
        return set()
    names = set()
    for line in path.read_text(errors="replace").splitlines():
        name, sep, value = line.strip().removeprefix("export ").partition("=")
        if not sep or name.lstrip().startswith("#"):
            continue
        value = value.strip()
        if value[:1] in ("'", '"'):
            value = value[1:].partition(value[0])[0]
        else:
            # An unquoted value ends where a comment starts, as compose reads it.
            value = re.split(r"\s#", value, maxsplit=1)[0].strip()
        if value:
            names.add(name.strip())
    return names


def refuse_secret_variables(env: Mapping[str, str], dot_env: Path | None) -> None:
    """Stop when a secret is set as a variable: it would be ignored, and an environment shows in `docker inspect`.

    Args:
        env: the container's environment.
        dot_env: the project's .env file (None: not checked).

    Raises:
        SystemExit: naming each variable, where it is set and the file that takes its value (never the value).
    """
    in_dot_env = dot_env_names(dot_env) if dot_env is not None else set()
    problems = []
    for name, file in SECRET_VARIABLES.items():
        where = [w for w, found in (("the environment", bool(env.get(name))), (".env", name in in_dot_env)) if found]
        if where:
            problems.append(f"{name} is set in {' and '.join(where)}: put its value in {file} and remove {name}")
    if problems:
        raise SystemExit(
            "secrets are read from files, never from variables (an environment shows in docker inspect):\n  "
            + "\n  ".join(problems)
        )


def _chosen_text(chosen: Path, name: str) -> str | None:
    """The content of the chosen file ``name``, or None when the user chose nothing."""
    path = chosen / name
    if not path.is_file():
        return None
    try:
        return path.read_text()
    except OSError as exc:
        raise SystemExit(f"{CHOSEN_DIR}/{name}: cannot read it ({exc.strerror})") from None


def _password(chosen: Path, name: str, existing: Path, nbytes: int) -> str:
    """The password chosen in ``chosen/name`` (checked), else the one generated before, else a new one.

    Args:
        chosen: the docker/secrets directory.
        name: the file the user may put the password in.
        existing: the file a previous start wrote.
        nbytes: random bytes of a new password (hex, twice as many characters).
    """
    given = _chosen_text(chosen, name)
    if given is not None:
        value = given.strip()
        if len(value) < MIN_PASSWORD_CHARS or not PASSWORD_CHARS.fullmatch(value):
            raise SystemExit(
                f"{CHOSEN_DIR}/{name}: write one line of at least {MIN_PASSWORD_CHARS} printable characters without "
                f"spaces, quotes or backslashes (openssl rand -hex 32), or delete the file to have one generated"
            )
        return value
    if existing.is_file() and existing.read_text().strip():
        return existing.read_text().strip()
    return secrets.token_hex(nbytes)


def _api_keys(chosen: Path, existing: Path) -> Keys:
    """tenant -> secrets: the chosen keys file (checked), else the one written before, else a new admin key."""
    from service.auth import KEY_VARIABLES, InvalidKeys, check_api_keys, parse_keys, read_keys_file

    given = _chosen_text(chosen, CHOSEN_API_KEYS)
    try:
        if given is not None:
            keys = parse_keys(ln for ln in given.splitlines() if not ln.lstrip().startswith("#"))
            if not keys:
                raise InvalidKeys("no 'tenant:secret' line")
        elif existing.is_file():
            keys = read_keys_file(existing)
        else:
            keys = {ADMIN_TENANT: (secrets.token_hex(24),)}
        check_api_keys(keys)
    except InvalidKeys as exc:
        problem = str(exc).removeprefix(f"{KEY_VARIABLES}: ")
        raise SystemExit(f"{CHOSEN_DIR}/{CHOSEN_API_KEYS}: {problem} (the secret is not shown)") from None
    return keys


def _write(path: Path, text: str, mode: int, uid: int | None = None) -> None:
    """Replace ``path`` atomically, with its mode (and owner) set before it becomes visible.

    A reader that watches the file (the service's keys file) sees a new inode, so it notices the change.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    if uid is not None and os.geteuid() == 0:
        os.chown(tmp, uid, uid)
    tmp.chmod(mode)
    tmp.replace(path)


def init(root: Path, chosen: Path, env: Mapping[str, str] | None = None, dot_env: Path | None = None) -> None:
    """Write every secret file: chosen values win, existing ones are kept, missing ones generated.

    Args:
        root: LPT_SECRETS_DIR, with the lpt/, trainer/, redis/ and grafana/ volumes mounted below it.
        chosen: the docker/secrets directory (missing: nothing chosen).
        env: the container's environment, refused when it sets a secret variable.
        dot_env: the project's .env, refused when it sets a secret variable (None: not checked).
    """
    refuse_secret_variables(env or {}, dot_env)
    lpt, trainer, redis, grafana = root / "lpt", root / "trainer", root / "redis", root / "grafana"
    for folder in (lpt, trainer, redis, grafana):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
    redis_password = _password(chosen, CHOSEN_REDIS_PASSWORD, lpt / "redis-password", 32)
    keys = _api_keys(chosen, lpt / "api-keys")
    grafana_password = _password(chosen, CHOSEN_GRAFANA_PASSWORD, grafana / "admin-password", 16)

    _write(lpt / "redis-password", redis_password + "\n", 0o400, SERVICE_UID)
    _write(lpt / "api-keys", "".join(f"{t}:{s}\n" for t, many in keys.items() for s in many), 0o400, SERVICE_UID)
    # The service never needs the admin key: only the trainer's volume holds it.
    (lpt / "admin-key").unlink(missing_ok=True)
    _write(trainer / "admin-key", next(iter(keys.values()))[0] + "\n", 0o400, SERVICE_UID)
    _write(redis / "redis.conf", f'requirepass "{redis_password}"\n', 0o444)
    _write(redis / "password", redis_password + "\n", 0o444)
    _write(grafana / "admin-password", grafana_password + "\n", 0o444)
    tenants = ", ".join(keys)
    print(f"secrets ready in {root} (tenants: {tenants}; read the first key with: lpt-secrets.py admin-key)")


def service_environment(root: Path, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with what the secrets the container mounts give it; anything already set is left alone.

    - LPT_STORE ``redis://host...`` without credentials gets the Redis password (lpt/, the service's volume).
    - LPT_API_KEYS_FILE points at the keys file (lpt/; unless LPT_API_KEYS or LPT_API_KEYS_FILE is set).
    - LPT_API_KEY (the trainer's key) becomes the admin key (trainer/, the trainer's volume).
    """
    lpt = root / "lpt"
    out = dict(env)
    store = out.get("LPT_STORE", "")
    password_file = lpt / "redis-password"
    scheme, sep, rest = store.partition("://")
    if scheme in ("redis", "rediss") and sep and "@" not in rest.split("/")[0] and password_file.is_file():
        password = quote(password_file.read_text().strip(), safe="")
        out["LPT_STORE"] = f"{scheme}://:{password}@{rest}"
    if not out.get("LPT_API_KEYS") and not out.get("LPT_API_KEYS_FILE") and (lpt / "api-keys").is_file():
        out["LPT_API_KEYS_FILE"] = str(lpt / "api-keys")
    admin_key = root / "trainer" / "admin-key"
    if not out.get("LPT_API_KEY") and admin_key.is_file():
        out["LPT_API_KEY"] = admin_key.read_text().strip()
    return out


def main(argv: list[str]) -> int:
    root = Path(os.environ.get("LPT_SECRETS_DIR", DEFAULT_DIR))
    project = Path(os.environ.get("LPT_PROJECT_DIR", DEFAULT_PROJECT_DIR))
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "init":
        init(root, project / CHOSEN_DIR, os.environ, project / ".env")
        return 0
    if command == "admin-key":
        print((root / "trainer" / "admin-key").read_text().strip())
        return 0
    if command == "exec" and args:
        os.execvpe(args[0], args, service_environment(root, os.environ))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
