"""API keys -> tenant. Secrets are compared as digests in constant time and never logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from service.errors import Unauthorized
from service.settings import DEFAULT_TENANT


class Authenticator:
    """Resolves an ``Authorization: Bearer <secret>`` header to a tenant.

    Args:
        keys: tenant -> secret. Empty means single-tenant mode: every caller is ``default``.
    """

    def __init__(self, keys: Mapping[str, str]):
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
