"""API keys -> tenant. Secrets are compared as digests in constant time and never logged.

A tenant may hold several keys at once, so a key is rotated with overlap: add the new one, move the clients,
remove the old one. The keys file (``LPT_API_KEYS_FILE``) is read again when it changes (checked every
``KEYS_FILE_POLL_S``) or on SIGHUP, without a restart; a file that does not parse, or holds a guessable key,
leaves the keys in force unchanged and logs why.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from lpt.errors import InvalidId
from lpt.ids import check_tenant_id
from service.errors import Unauthorized

log = logging.getLogger(__name__)

# Every caller's tenant when no API keys are configured (single-tenant mode).
DEFAULT_TENANT = "default"

# Where keys come from, named in every refusal so the operator knows what to fix.
KEY_VARIABLES = "LPT_API_KEYS / LPT_API_KEYS_FILE"
MIN_SECRET_CHARS = 16
# Words that mark a secret copied from an example instead of generated (compared without case or punctuation).
PLACEHOLDER_WORDS = ("changeme", "replaceme", "placeholder", "example", "yoursecret", "yourkey", "yourapikey")
# A generated secret of 16+ characters has many distinct characters; "aaaa..." or "12121212..." does not.
MIN_DISTINCT_CHARS = 4
KEYS_FILE_POLL_S = 2.0

# tenant -> its secrets (a single secret is read as a one-key tuple).
Keys = Mapping[str, str | Sequence[str]]


class InvalidKeys(ValueError):
    """Keys that must not be used: malformed pairs or guessable secrets. The message never shows a secret."""


def secrets_of(keys: Keys) -> dict[str, tuple[str, ...]]:
    """``keys`` with every tenant's secrets as a tuple."""
    return {tenant: (value,) if isinstance(value, str) else tuple(value) for tenant, value in keys.items()}


def parse_keys(pairs: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """``tenant:secret`` pairs (blank entries skipped) -> tenant -> secrets; a tenant may appear several times.

    Raises:
        InvalidKeys: a pair without a secret, or an invalid tenant id.
    """
    keys: dict[str, tuple[str, ...]] = {}
    for pair in pairs:
        if not pair.strip():
            continue
        tenant, sep, secret = pair.strip().partition(":")
        if not sep or not secret:
            raise InvalidKeys("API keys must be 'tenant:secret' pairs (the secret is not shown here)")
        try:
            check_tenant_id(tenant)
        except InvalidId as exc:
            raise InvalidKeys(f"API keys: {exc.message}") from None
        if secret not in keys.get(tenant, ()):
            keys[tenant] = (*keys.get(tenant, ()), secret)
    return keys


def read_keys_file(path: Path) -> dict[str, tuple[str, ...]]:
    """The ``tenant:secret`` lines of a keys file (``#`` comments)."""
    lines = Path(path).read_text().splitlines()
    return parse_keys(ln for ln in lines if not ln.lstrip().startswith("#"))


def merge_keys(*parts: Keys) -> dict[str, tuple[str, ...]]:
    merged: dict[str, tuple[str, ...]] = {}
    for part in parts:
        for tenant, secrets in secrets_of(part).items():
            merged[tenant] = (*merged.get(tenant, ()), *(s for s in secrets if s not in merged.get(tenant, ())))
    return merged


def check_api_keys(keys: Keys) -> None:
    """Refuse keys anyone could guess: short ones, example placeholders, a few characters repeated.

    Args:
        keys: tenant -> secret(s).

    Raises:
        InvalidKeys: naming the variable and the tenant (never the secret), so the service does not start with it.
    """
    for tenant, secrets in secrets_of(keys).items():
        for secret in secrets:
            problem = _weakness(secret)
            if problem:
                raise InvalidKeys(
                    f"{KEY_VARIABLES}: an API key of tenant {tenant!r} {problem}; "
                    "generate one with: openssl rand -hex 24"
                )


def _weakness(secret: str) -> str | None:
    """Why ``secret`` is guessable, or None."""
    if len(secret) < MIN_SECRET_CHARS:
        return f"is shorter than {MIN_SECRET_CHARS} characters"
    letters = re.sub(r"[^a-z0-9]", "", secret.lower())
    word = next((w for w in PLACEHOLDER_WORDS if w in letters), None)
    if word:
        return f"looks like a placeholder (contains {word!r})"
    if len(set(secret)) < MIN_DISTINCT_CHARS:
        return f"uses fewer than {MIN_DISTINCT_CHARS} distinct characters"
    return None


class Authenticator:
    """Resolves an ``Authorization: Bearer <secret>`` header to a tenant.

    Args:
        keys: tenant -> secret(s). Empty means single-tenant mode: every caller is ``default``. Guessable
            secrets are refused (``check_api_keys``), so a service with them never starts.
    """

    def __init__(self, keys: Keys):
        self._digests: list[tuple[str, bytes]] = []
        self.replace(keys)

    def replace(self, keys: Keys) -> None:
        """Serve with ``keys`` from now on (all or nothing: guessable keys raise and change nothing)."""
        check_api_keys(keys)
        digests = [(t, hashlib.sha256(s.encode()).digest()) for t, secrets in secrets_of(keys).items() for s in secrets]
        if self._digests and not digests:
            raise InvalidKeys(f"{KEY_VARIABLES}: no keys left; a service with keys cannot become single-tenant")
        self._digests = digests  # one assignment: a request sees the old list or the new one

    @property
    def single_tenant(self) -> bool:
        return not self._digests

    @property
    def tenants(self) -> list[str]:
        return sorted({tenant for tenant, _ in self._digests})

    def tenant_for(self, authorization: str | None) -> str:
        digests = self._digests
        if not digests:
            return DEFAULT_TENANT
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing or malformed 'Authorization: Bearer <key>' header")
        presented = hashlib.sha256(token.strip().encode()).digest()
        found = None
        # Compare against every key, without an early exit, so timing says nothing about which matched.
        for tenant, digest in digests:
            if hmac.compare_digest(presented, digest):
                found = tenant
        if found is None:
            raise Unauthorized("invalid API key")
        return found


class KeysFile:
    """Keeps an authenticator in step with a keys file: re-read when the file changes, or when asked (SIGHUP).

    Args:
        path: the keys file.
        inline: keys given another way (``LPT_API_KEYS``), kept beside the file's.
        auth: the authenticator to update.
    """

    def __init__(self, path: Path, inline: Keys, auth: Authenticator):
        self.path = Path(path)
        self.inline = inline
        self.auth = auth
        self._seen = self._stamp()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lpt-keys", daemon=True)

    def load(self) -> dict[str, tuple[str, ...]]:
        """The keys in force if the file were read now (raises InvalidKeys or OSError)."""
        return merge_keys(self.inline, read_keys_file(self.path))

    def reload(self) -> bool:
        """Read the file again; on any problem keep the keys in force and log why. True when keys changed."""
        self._seen = self._stamp()
        try:
            self.auth.replace(self.load())
        except (OSError, InvalidKeys) as exc:
            log.error("keys file %s not applied, the keys in force stay: %s", self.path, exc)
            return False
        log.info("keys file %s applied: %d tenants", self.path, len(self.auth.tenants))
        return True

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _watch(self) -> None:
        while not self._stop.wait(KEYS_FILE_POLL_S):
            if self._stamp() != self._seen:
                self.reload()
