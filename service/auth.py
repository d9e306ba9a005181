"""API keys -> tenant. Secrets are compared as digests in constant time and never logged."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

from service.errors import Unauthorized

# Every caller's tenant when no API keys are configured (single-tenant mode).
DEFAULT_TENANT = "default"

# Where keys come from, named in every refusal so the operator knows what to fix.
KEY_VARIABLES = "LPT_API_KEYS / LPT_API_KEYS_FILE"
MIN_SECRET_CHARS = 16
# Words that mark a secret copied from an example instead of generated (compared without case or punctuation).
PLACEHOLDER_WORDS = ("changeme", "replaceme", "placeholder", "example", "yoursecret", "yourkey", "yourapikey")
# A generated secret of 16+ characters has many distinct characters; "aaaa..." or "12121212..." does not.
MIN_DISTINCT_CHARS = 4


def check_api_keys(keys: Mapping[str, str]) -> None:
    """Refuse keys anyone could guess: short ones, example placeholders, a few characters repeated.

    Args:
        keys: tenant -> secret.

    Raises:
        SystemExit: naming the variable and the tenant (never the secret), so the service does not start.
    """
    for tenant, secret in keys.items():
        problem = _weakness(secret)
        if problem:
            raise SystemExit(
                f"{KEY_VARIABLES}: the API key of tenant {tenant!r} {problem}; generate one with: openssl rand -hex 24"
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
        keys: tenant -> secret. Empty means single-tenant mode: every caller is ``default``. Guessable
            secrets are refused (``check_api_keys``), so a service with them never starts.
    """

    def __init__(self, keys: Mapping[str, str]):
        check_api_keys(keys)
        self._digests = [(tenant, hashlib.sha256(secret.encode()).digest()) for tenant, secret in keys.items()]

    @property
    def single_tenant(self) -> bool:
        return not self._digests

    def tenant_for(self, authorization: str | None) -> str:
        if self.single_tenant:
            return DEFAULT_TENANT
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing or malformed 'Authorization: Bearer <key>' header")
        presented = hashlib.sha256(token.strip().encode()).digest()
        found = None
        # Compare against every key, without an early exit, so timing says nothing about which matched.
        for tenant, digest in self._digests:
            if hmac.compare_digest(presented, digest):
                found = tenant
        if found is None:
            raise Unauthorized("invalid API key")
        return found
