"""Schemathesis against the OpenAPI schema the app serves, through the real app (ASGI, lifespan on).

No response is a 5xx and every response conforms to the schema (status code, content type, headers, body).
Bounded: a few examples per operation, no deadline, so the whole run stays well under a minute.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.support.service_app import make_config, serve_in_thread

MAX_EXAMPLES = 30
BINARY_BODIES = {("POST", "/v1/prompts"), ("POST", "/v1/classify")}
CONTENT_ERRORS = {
    # images
    "empty_image", "corrupt_image", "unsupported_image", "image_too_large", "bad_image_dimensions", "polyglot_image",
    # bodies and multipart
    "too_large", "bad_multipart",
    # prompt sets (lpt.prompt_set codes)
    "not_safetensors", "bad_metadata", "bad_format", "missing_metadata", "missing_tensor", "unknown_tensor",
    "bad_dtype", "bad_shape", "non_finite", "fingerprint_mismatch", "depth_mismatch", "embed_dim_mismatch",
    "too_few_classes", "too_many_classes", "class_count_mismatch", "bad_share_blocks", "bad_top_k",
}  # fmt: skip


@pytest.fixture(scope="module")
def served(backbone, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("fuzz"), demo=True, max_image_bytes=64 * 1024)
    with serve_in_thread(config, backbone) as s:
        yield s


def lifespan_owned_elsewhere(app):
    """The app for schemathesis' in-process client: HTTP goes to the real app, whose lifespan the ``served``
    fixture already runs; schemathesis' own lifespan handshake is answered without starting a second one."""

    async def asgi(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    return asgi


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_asgi("/openapi.json", lifespan_owned_elsewhere(served.app))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_api_conforms_to_its_schema(case):
    response = case.call()
    positive = case.meta is None or not case.meta.generation.mode.is_negative
    if (case.method, case.path) in BINARY_BODIES and response.status_code in (400, 413, 415, 422):
        # The schema can only say "bytes": a schema-valid body that is not an image / a prompt set is a content
        # error, so "positive data must be accepted" cannot apply there. Such an error must be about the content.
        if positive:
            code = response.json()["error"]["code"]
            assert code in CONTENT_ERRORS, (case.method, case.path, response.status_code, response.text)
        case.validate_response(response, excluded_checks=[positive_data_acceptance])
    else:
        case.validate_response(response)
    assert response.status_code < 500, response.text
