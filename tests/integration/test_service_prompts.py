"""Prompt-set lifecycle through the real app: upload -> classify, rollback, ``version=N``, delete; API keys and
tenant isolation (another tenant's task answers exactly like a missing one and nothing of the owner's changes)."""

from __future__ import annotations

import sqlite3

import pytest

from lpt.forward import precompute_shared_kv
from service.settings import ServiceSettings
from tests.integration.service_helpers import assert_matches, classify, reference_probs, upload
from tests.support.images import image_bytes
from tests.support.prompt_sets import set_bytes
from tests.support.service_app import KEYS, auth, error_code, make_config, metrics, serve, state_of

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

IMG = image_bytes(seed=3)


async def test_upload_classify_rollback_version_and_delete(backbone, tmp_path):
    info = backbone.info
    v1, d1 = set_bytes(info, classes=4, pool=2, seed=1)
    v2, d2 = set_bytes(info, classes=6, pool=3, seed=2)
    async with serve(make_config(tmp_path), backbone) as (_app, c):
        r = await upload(c, "birds", d1)
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["num_classes"] == 4
        r = await classify(c, "birds", IMG)
        assert r.status_code == 200 and r.json()["version"] == 1
        assert_matches(r.json()["predictions"], reference_probs(backbone, v1, IMG))

        # Upload -> the very next classify answers with the new version.
        r = await upload(c, "birds", d2)
        assert r.status_code == 201 and r.json()["version"] == 2
        r = await classify(c, "birds", IMG)
        assert r.json()["version"] == 2
        assert_matches(r.json()["predictions"], reference_probs(backbone, v2, IMG))

        # version=N answers with that stored version, the active one is untouched.
        r = await classify(c, "birds", IMG, version=1)
        assert r.status_code == 200 and r.json()["version"] == 1
        assert_matches(r.json()["predictions"], reference_probs(backbone, v1, IMG))
        assert (await classify(c, "birds", IMG)).json()["version"] == 2
        r = await classify(c, "birds", IMG, version=9)
        assert r.status_code == 404 and error_code(r) == "not_found"

        # Rollback, then classify answers with the rolled-back version.
        activated = await c.post("/v1/prompts/birds/activate", params={"version": 1})
        assert activated.status_code == 200 and activated.json()["version"] == 1 and activated.json()["active"] is True
        r = await classify(c, "birds", IMG)
        assert r.json()["version"] == 1
        assert_matches(r.json()["predictions"], reference_probs(backbone, v1, IMG))
        show = (await c.get("/v1/prompts/birds")).json()
        assert show["active_version"] == 1 and [v["version"] for v in show["versions"]] == [1, 2]
        assert show["class_names"] == v1.class_names
        # activate and show describe a version alike, num_params included.
        assert activated.json() == show["versions"][0] and activated.json()["num_params"] == v1.num_params
        assert [t["task"] for t in (await c.get("/v1/prompts")).json()["tasks"]] == ["birds"]
        r = await c.post("/v1/prompts/birds/activate", params={"version": 7})
        assert r.status_code == 404 and error_code(r) == "not_found"

        # Delete: every read of the task is then a 404.
        r = await c.delete("/v1/prompts/birds")
        assert r.status_code == 200 and r.json() == {"task": "birds", "deleted": True}
        for r in (
            await classify(c, "birds", IMG),
            await classify(c, "birds", IMG, version=1),
            await c.get("/v1/prompts/birds"),
            await c.post("/v1/prompts/birds/activate", params={"version": 1}),
            await c.delete("/v1/prompts/birds"),
        ):
            assert r.status_code == 404 and error_code(r) == "not_found", r.text
        assert (await c.get("/v1/prompts")).json()["tasks"] == []
        r = await classify(c, "never-there", IMG)
        assert r.status_code == 404 and error_code(r) == "not_found"


async def test_missing_or_wrong_key_answers_401(backbone, tmp_path):
    _, data = set_bytes(backbone.info, seed=1)
    async with serve(make_config(tmp_path, api_keys=KEYS), backbone) as (_app, c):
        assert (await upload(c, "t", data, tenant="acme")).status_code == 201
        bad_headers = [
            {},
            {"Authorization": "Bearer wrong-secret-000000"},
            {"Authorization": f"Basic {KEYS['acme']}"},
            {"Authorization": "Bearer "},
            {"Authorization": KEYS["acme"]},
        ]
        for headers in bad_headers:
            for method, url, kw in (
                ("GET", "/v1/prompts", {}),
                ("GET", "/v1/prompts/t", {}),
                ("POST", "/v1/prompts?task=t", {"content": data}),
                ("POST", "/v1/prompts/t/activate?version=1", {}),
                ("DELETE", "/v1/prompts/t", {}),
                ("POST", "/v1/classify?task=t", {"content": IMG}),
            ):
                r = await c.request(method, url, headers=headers, **kw)
                assert r.status_code == 401, (method, url, headers, r.text)
                assert error_code(r) == "unauthorized"
        # Nothing changed: still one version, still served.
        show = (await c.get("/v1/prompts/t", headers=auth("acme"))).json()
        assert show["active_version"] == 1 and len(show["versions"]) == 1
        assert (await classify(c, "t", IMG, tenant="acme")).status_code == 200


async def test_tenant_isolation(backbone, tmp_path):
    info = backbone.info
    a1, d1 = set_bytes(info, classes=4, pool=2, seed=1)
    _a2, d2 = set_bytes(info, classes=5, pool=2, seed=2)
    g1, dg = set_bytes(info, classes=3, pool=0, seed=3)
    async with serve(make_config(tmp_path, api_keys=KEYS), backbone) as (_app, c):
        assert (await upload(c, "shared-name", d1, tenant="acme")).status_code == 201
        assert (await upload(c, "shared-name", d2, tenant="acme")).status_code == 201
        assert (await c.post("/v1/prompts/shared-name/activate?version=1", headers=auth("acme"))).status_code == 200
        assert (await upload(c, "acme-only", d1, tenant="acme")).status_code == 201
        before_show = (await c.get("/v1/prompts/shared-name", headers=auth("acme"))).json()
        before_list = (await c.get("/v1/prompts", headers=auth("acme"))).json()

        # globex sees none of acme's tasks; each answers exactly like a task that exists nowhere ("ghost").
        assert (await c.get("/v1/prompts", headers=auth("globex"))).json() == {"tasks": []}

        async def as_globex(task: str) -> list:
            return [
                await classify(c, task, IMG, tenant="globex"),
                await classify(c, task, IMG, tenant="globex", version=1),
                await c.get(f"/v1/prompts/{task}", headers=auth("globex")),
                await c.post(f"/v1/prompts/{task}/activate?version=2", headers=auth("globex")),
                await c.delete(f"/v1/prompts/{task}", headers=auth("globex")),
            ]

        ghosts = await as_globex("ghost")
        for task in ("shared-name", "acme-only"):
            for r, ghost in zip(await as_globex(task), ghosts, strict=True):
                assert r.status_code == ghost.status_code == 404, r.text
                assert error_code(r) == "not_found"
                assert r.text == ghost.text.replace("ghost", task), (r.text, ghost.text)

        # globex uploading the same task id makes its own task (namespaces are per tenant): acme's is untouched.
        r = await upload(c, "shared-name", dg, tenant="globex")
        assert r.status_code == 201 and r.json()["version"] == 1
        r = await classify(c, "shared-name", IMG, tenant="globex")
        assert r.json()["version"] == 1
        assert_matches(r.json()["predictions"], reference_probs(backbone, g1, IMG))
        assert (await c.delete("/v1/prompts/shared-name", headers=auth("globex"))).status_code == 200

        # The owner sees exactly what it had: same versions, same active version, same scores.
        assert (await c.get("/v1/prompts/shared-name", headers=auth("acme"))).json() == before_show
        assert (await c.get("/v1/prompts", headers=auth("acme"))).json() == before_list
        r = await classify(c, "shared-name", IMG, tenant="acme")
        assert r.status_code == 200 and r.json()["version"] == 1
        assert_matches(r.json()["predictions"], reference_probs(backbone, a1, IMG))


async def test_multipart_upload_and_identical_reupload(backbone, tmp_path):
    ps, data = set_bytes(backbone.info, classes=3, pool=2, seed=4)
    async with serve(make_config(tmp_path), backbone) as (_app, c):
        files = {"file": ("set.safetensors", data, "application/octet-stream")}
        r = await c.post("/v1/prompts", params={"task": "mp"}, files=files)
        assert r.status_code == 201, r.text
        first = r.json()
        assert first["version"] == 1 and first["num_classes"] == 3 and first["new_version"] is True
        r = await classify(c, "mp", IMG)
        assert r.status_code == 200 and r.json()["version"] == 1
        assert_matches(r.json()["predictions"], reference_probs(backbone, ps, IMG))
        # The same bytes again: 200 with the active version, nothing created (a lost answer can be retried).
        r = await upload(c, "mp", data)
        assert r.status_code == 200, r.text
        assert r.json() == {**first, "new_version": False}
        assert len((await c.get("/v1/prompts/mp")).json()["versions"]) == 1
        # Bytes equal to an older, inactive version are a new version: 201 again.
        _, other = set_bytes(backbone.info, classes=3, pool=2, seed=5)
        assert (await upload(c, "mp", other)).status_code == 201
        r = await upload(c, "mp", data)
        assert r.status_code == 201 and r.json()["version"] == 3 and r.json()["new_version"] is True


async def test_a_blob_failing_its_checksum_is_a_non_retryable_server_error(backbone, tmp_path):
    _, data = set_bytes(backbone.info, seed=6)
    async with serve(make_config(tmp_path), backbone) as (app, c):
        assert (await upload(c, "t", data)).status_code == 201
        state_of(app).prompt_sets.cache.discard_task("default", "t")  # not resident: the next classify reads the store
        db = sqlite3.connect(state_of(app).store.path)  # the disk flips one bit of the stored blob
        try:
            (blob,) = db.execute("SELECT data FROM blobs").fetchone()
            db.execute("UPDATE blobs SET data = ?", (blob[:-1] + bytes([blob[-1] ^ 1]),))
            db.commit()
        finally:
            db.close()
        for r in (await classify(c, "t", IMG), await c.get("/v1/prompts/t")):
            assert r.status_code == 500 and error_code(r) == "store_corrupt", r.text
            assert "Retry-After" not in r.headers  # retrying cannot help: this is not a 503
        m = await metrics(c)
        assert m["lpt_store_corrupt_total"] == 2 and m["lpt_store_errors_total"] == 0


async def test_showing_a_task_reads_metadata_without_making_its_set_resident(backbone, tmp_path):
    ps, data = set_bytes(backbone.info, classes=5, seed=7)
    async with serve(make_config(tmp_path), backbone) as (app, c):
        assert (await upload(c, "t", data)).status_code == 201
        cache = state_of(app).prompt_sets.cache
        cache.discard_task("default", "t")
        misses = (await metrics(c))["lpt_prompt_cache_misses_total"]
        show = await c.get("/v1/prompts/t")
        assert show.status_code == 200 and show.json()["class_names"] == ps.class_names
        assert len(cache) == 0 and (await metrics(c))["lpt_prompt_cache_misses_total"] == misses
        assert (await classify(c, "t", IMG)).status_code == 200  # classify loads it
        assert len(cache) == 1
        assert (await c.get("/v1/prompts/t")).json()["class_names"] == ps.class_names  # from the resident entry


async def test_a_set_larger_than_the_cache_budget_is_refused_naming_both_sizes(backbone, tmp_path):
    ps, data = set_bytes(backbone.info, classes=5, seed=3)
    resident = ps.nbytes + precompute_shared_kv(backbone.model, ps).nbytes  # float32 on the CPU, with keys/values
    assert resident > len(data)  # the file passes the upload limit; its resident copy is larger than the cache
    config = make_config(tmp_path, cache_bytes=len(data), max_prompt_bytes=len(data))
    async with serve(config, backbone) as (app, c):
        r = await upload(c, "big", data)
        assert r.status_code == 413, r.text
        message = r.json()["error"]["message"]
        assert f"takes {resident} bytes" in message and f"budget is {len(data)} bytes" in message, message
        assert (await c.get("/v1/prompts/big")).status_code == 404  # nothing stored
        assert state_of(app).store.list_tasks("default") == []


def test_a_cache_budget_below_the_upload_limit_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="--cache-bytes"):
        make_config(tmp_path, cache_bytes=1000, max_prompt_bytes=2000)
    with pytest.raises(SystemExit, match="--cache-bytes"):
        ServiceSettings(cache_bytes=1000, max_prompt_bytes=2000, device="cpu").freeze()
