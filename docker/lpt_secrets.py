"""Secrets of the compose stack: generated on first start into volumes, handed to the containers from there.

    lpt-secrets.py init              the `secrets` service: take what .env sets, keep what exists, generate the rest
    lpt-secrets.py admin-key         print the API key of the first tenant (tenant `admin` when generated)
    lpt-secrets.py exec CMD [ARG..]  entrypoint of lpt-serve and lpt-train: read the secrets, then exec CMD

So every install gets its own Redis password, API key and Grafana password, and nothing secret sits in the
compose file, in `docker inspect` or on a command line. One volume per consumer, so each container mounts
only what it reads (LPT_SECRETS_DIR, default /run/lpt-secrets):

    lpt/      redis-password, api-keys (tenant:secret lines), admin-key     service, trainer (uid 10001, 0400)
    redis/    redis.conf (requirepass), password                           redis (0444)
    grafana/  admin-password                                               grafana (0444)

Standard library only, plus ``service.auth.check_api_keys`` (the same rule the service applies) so a
placeholder key in .env stops the stack here, before anything starts.
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
# The tenant of the generated key.
ADMIN_TENANT = "admin"
# The service's user in the image (docker/Dockerfile); it owns the lpt/ files.
SERVICE_UID = 10001
MIN_PASSWORD_CHARS = 16
# Printable ASCII without space, quotes or backslash: safe in redis.conf and, URL-quoted, in redis:// URLs.
PASSWORD_CHARS = re.compile(r"[!#-&(-\[\]-~]+")


def _password(env: Mapping[str, str], name: str, existing: Path, nbytes: int) -> str:
    """The password .env sets (checked), else the one generated before, else a new one.

    Args:
        env: the container's environment (compose passes the .env values, empty when unset).
        name: the variable to take it from.
        existing: the file a previous start wrote.
        nbytes: random bytes of a new password (hex, twice as many characters).
    """
    given = env.get(name, "")
    if given:
        if len(given) < MIN_PASSWORD_CHARS or not PASSWORD_CHARS.fullmatch(given):
            raise SystemExit(
                f"{name}: use at least {MIN_PASSWORD_CHARS} printable characters without spaces, quotes or "
                f"backslashes (openssl rand -hex 32), or leave it unset to have one generated"
            )
        return given
    if existing.is_file() and existing.read_text().strip():
        return existing.read_text().strip()
    return secrets.token_hex(nbytes)


def _api_keys(env: Mapping[str, str], existing: Path) -> list[tuple[str, str]]:
    """(tenant, secret) pairs: LPT_API_KEYS from .env, else the generated file, else a new admin key."""
    given = env.get("LPT_API_KEYS", "")
    if given:
        pairs = [p.strip().partition(":") for p in given.split(",") if p.strip()]
        if any(not sep or not tenant or not secret for tenant, sep, secret in pairs):
            raise SystemExit("LPT_API_KEYS: expected comma-separated tenant:secret pairs (the secret is not shown)")
        keys = [(tenant, secret) for tenant, _, secret in pairs]
    elif existing.is_file():
        lines = existing.read_text().splitlines()
        keys = [(t, s) for t, _, s in (ln.partition(":") for ln in lines if ln.strip())]
    else:
        keys = [(ADMIN_TENANT, secrets.token_hex(24))]
    from service.auth import check_api_keys

    check_api_keys(dict(keys))
    return keys


def _write(path: Path, text: str, mode: int, uid: int | None = None) -> None:
    """Replace ``path`` atomically, with its mode (and owner) set before it becomes visible."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    if uid is not None and os.geteuid() == 0:
        os.chown(tmp, uid, uid)
    tmp.chmod(mode)
    tmp.replace(path)


def init(root: Path, env: Mapping[str, str]) -> None:
    """Write every secret file; values from ``env`` win, existing ones are kept, missing ones generated.

    Args:
        root: LPT_SECRETS_DIR, with the lpt/, redis/ and grafana/ volumes mounted below it.
        env: the environment compose gives the `secrets` service.
    """
    lpt, redis, grafana = root / "lpt", root / "redis", root / "grafana"
    for folder in (lpt, redis, grafana):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
    redis_password = _password(env, "REDIS_PASSWORD", lpt / "redis-password", 32)
    keys = _api_keys(env, lpt / "api-keys")
    grafana_password = _password(env, "GRAFANA_ADMIN_PASSWORD", grafana / "admin-password", 16)

    _write(lpt / "redis-password", redis_password + "\n", 0o400, SERVICE_UID)
    _write(lpt / "api-keys", "".join(f"{t}:{s}\n" for t, s in keys), 0o400, SERVICE_UID)
    _write(lpt / "admin-key", keys[0][1] + "\n", 0o400, SERVICE_UID)
    _write(redis / "redis.conf", f'requirepass "{redis_password}"\n', 0o444)
    _write(redis / "password", redis_password + "\n", 0o444)
    _write(grafana / "admin-password", grafana_password + "\n", 0o444)
    tenants = ", ".join(t for t, _ in keys)
    print(f"secrets ready in {root} (tenants: {tenants}; read the first key with: lpt-secrets.py admin-key)")


def service_environment(root: Path, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with what the secrets give lpt-serve and lpt-train; anything already set is left alone.

    - LPT_STORE ``redis://host...`` without credentials gets the Redis password.
    - LPT_API_KEYS_FILE points at the keys file (unless LPT_API_KEYS or LPT_API_KEYS_FILE is set).
    - LPT_API_KEY (the trainer's and the ``lpt`` CLI's key) becomes the admin key.
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
    if not out.get("LPT_API_KEY") and (lpt / "admin-key").is_file():
        out["LPT_API_KEY"] = (lpt / "admin-key").read_text().strip()
    return out


def main(argv: list[str]) -> int:
    root = Path(os.environ.get("LPT_SECRETS_DIR", DEFAULT_DIR))
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "init":
        init(root, os.environ)
        return 0
    if command == "admin-key":
        print((root / "lpt" / "admin-key").read_text().strip())
        return 0
    if command == "exec" and args:
        os.execvpe(args[0], args, service_environment(root, os.environ))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
