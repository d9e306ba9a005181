"""Hostile identifiers, oversize bodies and malformed multipart, through the real app.

Bad task ids answer 422 (query and path forms) and touch nothing; oversize bodies answer 413 without the body
being read; many parts, huge part headers and malformed Content-Types answer 4xx quickly. Installed versions
of the multipart stack are checked against the releases that fixed their known DoS advisories.
"""

from __future__ import annotations

import time
from importlib.metadata import version
from urllib.parse import quote

import pytest

from tests.support.images import png_bytes
from tests.support.prompt_sets import prompt_bytes
from tests.support.service_app import error_code, make_config, serve_in_thread

IMAGE_LIMIT = 256 * 1024
PROMPT_LIMIT = 512 * 1024
QUICK_S = 2.0
HUGE = "version=" + "9" * 30
BOUNDARY = "lptBoundary7"

BAD_IDS = [
    "../etc",
    "..",
    ".hidden",
    "-dash",
    "a:b",
    "tenant:task",
    "a*",
    "*",
    "a b",
    " a",
    "a\tb",
    "task\n",
    "a\x00b",
    "x" * 1024,
    "x" * 65,
    "TASK",
    "t\u0430sk",  # Cyrillic a
    "\uff54ask",  # fullwidth t
    "task\u200b",  # zero-width space
    "caf\u00e9",
    "a%2Fb",
    "a?b",
    "a#b",
    "a/b",
    "../../x",
]


@pytest.fixture(scope="module")
def served(backbone, tmp_path_factory):
    config = make_config(
        tmp_path_factory.mktemp("http"), demo=True, max_image_bytes=IMAGE_LIMIT, max_prompt_bytes=PROMPT_LIMIT
    )
    with serve_in_thread(config, backbone) as s:
        yield s


def nothing_new_stored(served) -> None:
    assert served.state.store.list_tasks("default") == ["demo"]


# -- identifiers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", BAD_IDS, ids=lambda t: repr(t)[:20])
def test_bad_task_id_in_query(served, task, backbone):
    q = quote(task, safe="")
    calls = [
        ("POST", f"/v1/classify?task={q}", {"content": png_bytes(), "headers": {"content-type": "image/png"}}),
        ("POST", f"/v1/prompts?task={q}", {"content": prompt_bytes(backbone.info)}),
    ]
    for method, url, kw in calls:
        r = served.request(method, url, **kw)
        assert r.status_code == 422, (url, r.text)
        assert error_code(r) == "invalid_task_id" and r.json()["error"]["field"] == "task", r.text
    nothing_new_stored(served)


@pytest.mark.parametrize("task", BAD_IDS, ids=lambda t: repr(t)[:20])
def test_bad_task_id_in_path(served, task):
    q = quote(task, safe="")
    calls = [
        ("GET", f"/v1/prompts/{q}"),
        ("DELETE", f"/v1/prompts/{q}"),
        ("POST", f"/v1/prompts/{q}/activate?version=1"),
    ]
    for method, url in calls:
        r = served.request(method, url)
        if "/" in task or task in (".", ".."):
            # A path segment cannot hold a '/' (and '..' is resolved by the client): no route, no handler runs.
            assert r.status_code == 404, (url, r.text)
            assert error_code(r) == "not_found"
        else:
            assert r.status_code == 422, (url, r.text)
            assert error_code(r) == "invalid_task_id", r.text
    nothing_new_stored(served)
    assert served.get("/v1/prompts/demo").status_code == 200  # the real task is untouched


def test_task_missing_or_repeated(served):
    r = served.post("/v1/classify", content=png_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 422 and error_code(r) == "invalid_request"
    r = served.post("/v1/classify?task=demo&task=../x", content=png_bytes(), headers={"content-type": "image/png"})
    assert r.status_code in (200, 422)  # FastAPI takes one value; either way it was checked
    if r.status_code == 422:
        assert error_code(r) == "invalid_task_id"


@pytest.mark.parametrize(
    "query",
    ["top_k=0", "top_k=-1", "top_k=abc", "top_k=1e9", "version=0", "version=-3", "version=x", "version=1.5", HUGE],
)
def test_bad_numeric_parameters(served, query):
    r = served.post(f"/v1/classify?task=demo&{query}", content=png_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 422 and error_code(r) == "invalid_request", r.text


@pytest.mark.parametrize("query", ["version=0", "version=x", HUGE, "version=9223372036854775808"])
def test_bad_version_for_rollback(served, query):
    # A version past the store's 64-bit integer column once reached SQLite and answered 500 (OverflowError).
    r = served.post(f"/v1/prompts/demo/activate?{query}")
    assert r.status_code == 422 and error_code(r) == "invalid_request", r.text
    assert served.state.store.active_version("default", "demo").version == 1


@pytest.mark.parametrize(
    ("method", "url", "allowed"),
    [
        ("PUT", "/v1/prompts", "GET, POST"),
        ("OPTIONS", "/v1/prompts/demo", "DELETE, GET"),
        ("GET", "/v1/classify?task=demo", "POST"),
    ],
)
def test_405_lists_every_allowed_method(served, method, url, allowed):
    # Starlette named only the first route on the path (e.g. "Allow: POST" on /v1/prompts, which also has GET).
    r = served.request(method, url)
    assert r.status_code == 405 and error_code(r) == "method_not_allowed"
    assert r.headers["allow"] == allowed


# -- oversize bodies ----------------------------------------------------------------------------------------
def stream(chunk: int, count: int, sent: list[int]):
    async def gen():
        for _ in range(count):
            sent[0] += 1
            yield b"\x00" * chunk

    return gen()


@pytest.mark.parametrize("url", ["/v1/classify?task=demo", "/v1/prompts?task=big"])
def test_declared_oversize_body_is_refused_before_reading(served, url):
    sent = [0]
    started = time.perf_counter()
    r = served.post(
        url,
        content=stream(1024 * 1024, 10_000, sent),  # 10 GB if anyone read it
        headers={"content-length": str(10_000 * 1024 * 1024), "content-type": "application/octet-stream"},
    )
    assert r.status_code == 413 and error_code(r) in ("too_large", "image_too_large"), r.text
    assert sent[0] == 0  # not one chunk was pulled
    assert time.perf_counter() - started < QUICK_S
    nothing_new_stored(served)


@pytest.mark.parametrize("url", ["/v1/classify?task=demo", "/v1/prompts?task=big"])
def test_chunked_oversize_body_stops_at_the_limit(served, url):
    sent = [0]
    started = time.perf_counter()
    r = served.post(url, content=stream(64 * 1024, 16_384, sent), headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413 and error_code(r) == "too_large", r.text
    limit_chunks = (PROMPT_LIMIT + 64 * 1024 if "prompts" in url else IMAGE_LIMIT) // (64 * 1024)
    assert sent[0] <= limit_chunks + 2  # read up to the limit, not the 1 GB offered
    assert time.perf_counter() - started < QUICK_S
    nothing_new_stored(served)


def test_prompt_set_just_over_the_limit(served):
    r = served.post("/v1/prompts?task=big", content=b"\x00" * (PROMPT_LIMIT + 1))
    assert r.status_code == 413 and error_code(r) == "too_large"
    nothing_new_stored(served)


def test_image_just_over_the_limit(served):
    r = served.post(
        "/v1/classify?task=demo", content=b"\x00" * (IMAGE_LIMIT + 1), headers={"content-type": "image/png"}
    )
    assert r.status_code == 413 and error_code(r) == "too_large"


def test_bad_content_length(served):
    for value in ("abc", "-5"):
        r = served.post("/v1/prompts?task=big", content=b"12345", headers={"content-length": value})
        assert 400 <= r.status_code < 500, (value, r.text)
    nothing_new_stored(served)


# -- multipart ----------------------------------------------------------------------------------------------
def multipart(parts: list[tuple[str, bytes]], extra_headers: str = "", boundary: str = BOUNDARY) -> bytes:
    body = b""
    for name, data in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f.bin"\r\n{extra_headers}'
        body += head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


MP = f"multipart/form-data; boundary={BOUNDARY}"


def post_multipart(served, url: str, body: bytes, ctype: str = MP):
    started = time.perf_counter()
    r = served.post(url, content=body, headers={"content-type": ctype})
    return r, time.perf_counter() - started


@pytest.mark.parametrize("url", ["/v1/classify?task=demo", "/v1/prompts?task=big"])
@pytest.mark.parametrize(
    ("label", "body", "ctype", "status", "code"),
    [
        ("many-parts", multipart([("image", b"x")] * 1000), MP, 400, "bad_multipart"),
        ("many-small-parts", multipart([("file", b"")] * 2000), MP, 400, "bad_multipart"),
        (
            "huge-part-header",
            multipart([("image", b"x")], "X-Pad: " + "a" * 100_000 + "\r\n"),
            MP,
            400,
            "bad_multipart",
        ),
        ("many-part-headers", multipart([("image", b"x")], "X-Pad: a\r\n" * 10_000), MP, 400, "bad_multipart"),
        ("no-boundary", multipart([("image", b"x")]), "multipart/form-data", 400, "bad_multipart"),
        ("empty-boundary", multipart([("image", b"x")]), "multipart/form-data; boundary=", 400, "bad_multipart"),
        ("wrong-boundary", multipart([("image", b"x")]), "multipart/form-data; boundary=zzz", 400, "bad_multipart"),
        ("only-crlf", b"\r\n" * 100_000, MP, 400, "bad_multipart"),
        ("epilogue", multipart([("nothing", b"x")]) + b"\r\n-" * 50_000, MP, 400, "bad_multipart"),
        ("no-parts", f"--{BOUNDARY}--\r\n".encode(), MP, 400, "bad_multipart"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 and "/" not in v else "",
)
def test_malformed_multipart_is_refused_quickly(served, url, label, body, ctype, status, code):
    r, elapsed = post_multipart(served, url, body, ctype)
    assert r.status_code == status and error_code(r) == code, (label, r.text)
    assert elapsed < QUICK_S
    nothing_new_stored(served)


def test_multipart_body_over_its_cap(served):
    parts = [("image", b"\x00" * IMAGE_LIMIT)] * 9  # more than 8 images' worth
    r, elapsed = post_multipart(served, "/v1/classify?task=demo", multipart(parts))
    assert r.status_code == 413 and error_code(r) == "too_large"
    assert elapsed < QUICK_S


def test_multipart_part_over_the_image_limit(served):
    r, _ = post_multipart(served, "/v1/classify?task=demo", multipart([("image", b"\x00" * (IMAGE_LIMIT + 10))]))
    assert 400 <= r.status_code < 500 and error_code(r) in ("bad_multipart", "image_too_large", "too_large"), r.text


@pytest.mark.parametrize(
    "ctype", [";;;==", "multipart/mixed; boundary=x", "*/*", "image/", "image/svg+xml; charset=utf-8"]
)
def test_malformed_content_type_for_classify(served, ctype):
    r = served.post("/v1/classify?task=demo", content=png_bytes(), headers={"content-type": ctype})
    assert r.status_code == 415 and error_code(r) == "unsupported_media_type", (ctype, r.text)


def test_valid_multipart_still_works(served):
    r, _ = post_multipart(served, "/v1/classify?task=demo", multipart([("image", png_bytes())] * 3))
    assert r.status_code == 200 and len(r.json()["results"]) == 3


# -- dependency floors --------------------------------------------------------------------------------------
def _v(text: str) -> tuple[int, ...]:
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:3])


@pytest.mark.parametrize(
    ("package", "fixed_in", "advisories"),
    [
        # starlette: CVE-2024-47874 (0.40.0, unbounded form fields), CVE-2025-54121 (0.47.2, spooled-file rollover
        # blocks the loop), CVE-2025-62727 (0.49.1, Range header), CVE-2026-48710 (1.0.1, Host header),
        # PYSEC-2026-248 (1.3.0, path), CVE-2026-54283 (1.3.1, urlencoded form limits ignored).
        ("starlette", "1.3.1", "CVE-2024-47874 ... CVE-2026-54283"),
        # python-multipart: CVE-2024-24762 (0.0.7, Content-Type ReDoS), CVE-2024-53981 (0.0.18, CR/LF before
        # the first boundary), CVE-2026-24486 (0.0.22), CVE-2026-40347 (0.0.26, preamble/epilogue),
        # CVE-2026-42561 (0.0.27, part headers), CVE-2026-53537/53538/53539 (0.0.30), GHSA-v9pg-7xvm-68hf (0.0.31).
        ("python-multipart", "0.0.31", "CVE-2024-24762 ... GHSA-v9pg-7xvm-68hf"),
    ],
)
def test_installed_multipart_stack_is_past_known_dos_fixes(package, fixed_in, advisories):
    assert _v(version(package)) >= _v(fixed_in), f"{package} {version(package)} predates {fixed_in} ({advisories})"
