"""API keys: guessable secrets are refused before the service serves anything; good ones resolve to tenants."""

from __future__ import annotations

import secrets

import pytest

from service.auth import MIN_SECRET_CHARS, Authenticator, InvalidKeys, check_api_keys
from service.errors import Unauthorized
from tests.support.lpt_serve import TEST_BACKBONE_ARGS, run_lpt_serve
from tests.support.ports import free_port

# A published example secret: anyone can guess it, so it must never open a service.
OLD_EXAMPLE = "change-me-to-a-long-random-secret"


@pytest.mark.parametrize(
    "secret,why",
    [
        (OLD_EXAMPLE, "placeholder"),
        ("REPLACE_ME_with_a_real_key_0123", "placeholder"),
        ("your-api-key-goes-here-please", "placeholder"),
        ("an-example-secret-for-the-docs", "placeholder"),
        ("a" * 40, "distinct"),
        ("12121212121212121212", "distinct"),
        ("x7Gq-short", "shorter"),
        ("k" * (MIN_SECRET_CHARS - 1), "shorter"),
    ],
)
def test_guessable_keys_are_refused_naming_the_variable_and_tenant_not_the_secret(secret, why):
    with pytest.raises(InvalidKeys) as refused:
        check_api_keys({"acme": "acme-secret-0123456789", "globex": secret})
    message = str(refused.value)
    assert "LPT_API_KEYS" in message and "'globex'" in message and why in message
    assert secret not in message and "acme-secret" not in message
    with pytest.raises(InvalidKeys):
        Authenticator({"globex": secret})


def test_generated_keys_pass_and_resolve_to_their_tenant():
    keys = {"acme": secrets.token_hex(24), "globex": secrets.token_urlsafe(16), "initech": "acme-secret-0123456789"}
    check_api_keys(keys)
    auth = Authenticator(keys)
    assert not auth.single_tenant
    for tenant, secret in keys.items():
        assert auth.tenant_for(f"Bearer {secret}") == tenant
    for header in (None, "", "Bearer ", f"Basic {keys['acme']}", "Bearer " + keys["acme"][:-1]):
        with pytest.raises(Unauthorized):
            auth.tenant_for(header)


def test_no_keys_is_single_tenant():
    check_api_keys({})
    assert Authenticator({}).tenant_for(None) == "default"


def test_lpt_serve_refuses_to_start_with_the_example_key(tmp_path):
    """The real process: it exits non-zero, says which variable is wrong, and never prints the secret."""
    args = ["--port", str(free_port()), *TEST_BACKBONE_ARGS, "--data-dir", str(tmp_path)]
    done = run_lpt_serve(*args, env={"LPT_API_KEYS": f"acme:{OLD_EXAMPLE}"})
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "LPT_API_KEYS" in output and "'acme'" in output and "placeholder" in output
    assert OLD_EXAMPLE not in output
