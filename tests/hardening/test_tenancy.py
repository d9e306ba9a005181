"""Two tenants. Every endpoint tried across tenants answers exactly as for a task that does not exist
(404) and changes nothing of the owner's; missing or wrong keys answer 401; secrets never reach logs, metrics or
error bodies."""

from __future__ import annotations

import logging

import pytest

from tests.support.images import png_bytes
from tests.support.prompt_sets import prompt_bytes
from tests.support.service_app import KEYS, auth, error_code, make_config, serve_in_thread

ALPHA_ONLY = "alpha-only"
SHARED = "shared-name"  # both tenants have a task with this id: each must see only its own
NEVER = "never-existed"


@pytest.fixture(scope="module")
def served(backbone, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("tenancy"), api_keys=dict(KEYS))
    with serve_in_thread(config, backbone) as s:
        info = backbone.info
        for tenant, task, seed in [("alpha", ALPHA_ONLY, 1), ("alpha", ALPHA_ONLY, 2), ("alpha", SHARED, 3)]:
            data = prompt_bytes(info, classes=3, seed=seed)
            r = s.post(f"/v1/prompts?task={task}", content=data, headers=auth(tenant))
            assert r.status_code == 201, r.text
        r = s.post(f"/v1/prompts?task={SHARED}", content=prompt_bytes(info, classes=5, seed=4), headers=auth("beta"))
        assert r.status_code == 201, r.text
        yield s


def snapshot(served, tenant: str) -> dict:
    """Everything a tenant owns, read straight from the store (and through the API as that tenant)."""
    store = served.state.store
    out = {}
    for task in store.list_tasks(tenant):
        versions = store.list_versions(tenant, task)
        out[task] = {
            "active": store.active_version(tenant, task).version,
            "versions": [(v.version, v.sha256) for v in versions],
        }
    out["api"] = served.get("/v1/prompts", headers=auth(tenant)).json()
    return out


def cross_calls(task: str) -> list[tuple[str, str, dict]]:
    image = {"content": png_bytes(), "headers": {"content-type": "image/png"}}
    return [
        ("GET", f"/v1/prompts/{task}", {}),
        ("POST", f"/v1/classify?task={task}", image),
        ("POST", f"/v1/classify?task={task}&version=1", image),
        ("POST", f"/v1/prompts/{task}/activate?version=1", {}),
        ("DELETE", f"/v1/prompts/{task}", {}),
    ]


def without_task(body: dict, task: str) -> dict:
    return {"error": {k: (v.replace(task, "<task>") if isinstance(v, str) else v) for k, v in body["error"].items()}}


def test_other_tenants_task_is_indistinguishable_from_a_missing_one(served):
    alpha_before = snapshot(served, "alpha")
    for method, url, kw in cross_calls(ALPHA_ONLY):
        kw = {**kw, "headers": {**kw.get("headers", {}), **auth("beta")}}
        r = served.request(method, url, **kw)
        assert r.status_code == 404, (method, url, r.text)
        assert error_code(r) == "not_found"
        missing = served.request(method, url.replace(ALPHA_ONLY, NEVER), **kw)
        assert missing.status_code == 404
        assert without_task(r.json(), ALPHA_ONLY) == without_task(missing.json(), NEVER)  # same answer, same words
    assert snapshot(served, "alpha") == alpha_before


def test_list_shows_only_own_tasks(served):
    alpha = {t["task"] for t in served.get("/v1/prompts", headers=auth("alpha")).json()["tasks"]}
    beta = {t["task"] for t in served.get("/v1/prompts", headers=auth("beta")).json()["tasks"]}
    assert alpha == {ALPHA_ONLY, SHARED}
    assert beta == {SHARED}


def test_same_task_id_is_two_separate_tasks(served):
    alpha = served.get(f"/v1/prompts/{SHARED}", headers=auth("alpha")).json()
    beta = served.get(f"/v1/prompts/{SHARED}", headers=auth("beta")).json()
    assert len(alpha["class_names"]) == 3 and len(beta["class_names"]) == 5
    assert alpha["versions"][0]["sha256"] != beta["versions"][0]["sha256"]
    for tenant, classes in (("alpha", 3), ("beta", 5)):
        r = served.post(
            f"/v1/classify?task={SHARED}&top_k=100",
            content=png_bytes(),
            headers={**auth(tenant), "content-type": "image/png"},
        )
        assert r.status_code == 200 and len(r.json()["predictions"]) == classes


def test_upload_over_another_tenants_task_lands_in_own_namespace(served, backbone):
    alpha_before = snapshot(served, "alpha")
    r = served.post(f"/v1/prompts?task={ALPHA_ONLY}", content=prompt_bytes(backbone.info, seed=9), headers=auth("beta"))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1  # numbering is beta's own: nothing reveals alpha's two versions
    assert snapshot(served, "alpha") == alpha_before
    # Cleaning up as beta removes beta's task only.
    assert served.delete(f"/v1/prompts/{ALPHA_ONLY}", headers=auth("beta")).status_code == 200
    assert snapshot(served, "alpha") == alpha_before
    r = served.post(
        f"/v1/classify?task={ALPHA_ONLY}", content=png_bytes(), headers={**auth("alpha"), "content-type": "image/png"}
    )
    assert r.status_code == 200


BAD_AUTH = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong-key-0123456789"},
    {"Authorization": f"Bearer {KEYS['alpha']}x"},
    {"Authorization": f"Bearer {KEYS['alpha'][:-1]}"},
    {"Authorization": f"Basic {KEYS['alpha']}"},
    {"Authorization": KEYS["alpha"]},
    {"Authorization": "alpha:" + KEYS["alpha"]},
    {"X-Api-Key": KEYS["alpha"]},
]


@pytest.mark.parametrize("headers", BAD_AUTH, ids=range(len(BAD_AUTH)))
def test_missing_or_wrong_key_is_401_everywhere(served, headers, backbone):
    before = snapshot(served, "alpha")
    calls = [
        *cross_calls(ALPHA_ONLY),
        ("GET", "/v1/prompts", {}),
        ("POST", "/v1/prompts?task=intruder", {"content": prompt_bytes(backbone.info)}),
    ]
    for method, url, kw in calls:
        r = served.request(method, url, **{**kw, "headers": {**kw.get("headers", {}), **headers}})
        assert r.status_code == 401, (method, url, headers, r.text)
        assert error_code(r) == "unauthorized"
        for secret in KEYS.values():
            assert secret not in r.text and secret[:12] not in r.text
    assert snapshot(served, "alpha") == before
    assert served.state.store.list_tasks("default") == []


def test_unauthenticated_probe_endpoints_stay_open(served):
    for url in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert served.get(url).status_code == 200, url


def test_secrets_never_reach_logs_or_metrics(backbone, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    config = make_config(tmp_path, api_keys=dict(KEYS), demo=True)
    wrong = "Bearer not-a-key-but-maybe-someone-elses-real-key"
    with serve_in_thread(config, backbone) as s:
        image = {"content": png_bytes(), "headers": {"content-type": "image/png"}}
        for headers in (auth("alpha"), auth("beta"), {"Authorization": wrong}, {}):
            s.post("/v1/classify?task=demo", **{**image, "headers": {**image["headers"], **headers}})
            s.get("/v1/prompts", headers=headers)
            s.post("/v1/prompts?task=x", content=b"\x00" * 64, headers=headers)
        s.post("/v1/classify?task=demo", content=b"corrupt", headers={**auth("alpha"), "content-type": "image/png"})
        metrics = s.get("/metrics").text
        assert 'lpt_requests_total{endpoint="/v1/classify",status="401"}' in metrics  # the calls were counted
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    assert caplog.records  # something was logged (start-up, demo, errors)
    for secret in [*KEYS.values(), wrong.split()[1]]:
        assert secret not in text, "a secret reached the logs"
        assert secret not in metrics, "a secret reached /metrics"
