"""Cross-task dynamic batching through the real app: concurrent requests for 10 tasks of different class counts
and pool sizes run as one forward, and every answer equals that task's single-task forward."""

from __future__ import annotations

import pytest

from tests.integration.service_helpers import assert_matches, classify_each, reference_probs, upload
from tests.support.images import image_bytes
from tests.support.prompt_sets import set_bytes
from tests.support.service_app import make_config, metrics, serve, state_of

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

# (classes, pool size, top_k): different class counts, pool sizes (0: no pool) and top-k
TASKS = [(3, 2, 1), (5, 4, 2), (2, 0, 1), (7, 3, 3), (4, 1, 1), (10, 5, 2), (6, 0, 1), (8, 2, 2), (9, 6, 3), (11, 3, 1)]


async def test_concurrent_requests_for_ten_tasks_share_one_forward_and_match_single_task(backbone, tmp_path):
    n = len(TASKS)
    config = make_config(tmp_path, max_batch_size=n, max_wait_ms=3000.0, request_timeout=20.0)
    sets = {}
    async with serve(config, backbone) as (app, client):
        for i, (classes, pool, top_k) in enumerate(TASKS):
            ps, data = set_bytes(backbone.info, classes=classes, pool=pool, top_k=top_k, seed=100 + i)
            r = await upload(client, f"task-{i}", data)
            assert r.status_code == 201, r.text
            assert r.json()["version"] == 1 and r.json()["num_classes"] == classes
            sets[f"task-{i}"] = ps
        images = {task: image_bytes(seed=i) for i, task in enumerate(sets)}
        assert state_of(app).worker.batches == 0

        responses = await classify_each(client, images)
        for task, r in responses.items():
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["task"] == task and body["version"] == 1
            assert len(body["predictions"]) == sets[task].num_classes  # top_k above the class count: every class
            assert_matches(body["predictions"], reference_probs(backbone, sets[task], images[task]))

        # One forward carried all ten tasks: seen in the batch metrics and the worker's counter.
        m = await metrics(client)
        assert state_of(app).worker.batches == 1
        assert m["lpt_batch_size_count"] == 1 and m["lpt_batch_size_sum"] == n
        assert m["lpt_batch_tasks_count"] == 1 and m["lpt_batch_tasks_sum"] == n
        assert m['lpt_requests_total{endpoint="/v1/classify",status="200"}'] == n


async def test_multipart_images_answer_in_order_and_match_single_task(backbone, tmp_path):
    config = make_config(tmp_path, max_batch_size=8, max_wait_ms=5.0)
    ps, data = set_bytes(backbone.info, classes=5, pool=3, seed=7)
    imgs = [image_bytes(seed=s) for s in (11, 12, 13)]
    async with serve(config, backbone) as (_app, client):
        assert (await upload(client, "multi", data)).status_code == 201
        files = [("image", (f"i{k}.png", b, "image/png")) for k, b in enumerate(imgs)]
        r = await client.post("/v1/classify", params={"task": "multi", "top_k": 50}, files=files)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "multi" and body["version"] == 1 and len(body["results"]) == 3
        for result, img in zip(body["results"], imgs, strict=True):
            assert_matches(result["predictions"], reference_probs(backbone, ps, img))

        r = await client.post("/v1/classify", params={"task": "multi", "top_k": 2}, content=imgs[0])
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2


async def test_sets_of_different_geometry_in_one_batch_each_match_single_task(backbone, tmp_path):
    """Prompt length or share_blocks differ: one batch, one forward per geometry, rows back in their places."""
    info = backbone.info
    specs = [(3, 2, 2, 3), (4, 0, 4, 3), (5, 3, 2, 2), (2, 1, 4, 3), (6, 2, 2, 3)]  # classes, pool, L, S
    sets, datas = {}, {}
    for i, (classes, pool, length, share) in enumerate(specs):
        spec = {"classes": classes, "pool": pool, "prompt_length": length, "share_blocks": share, "seed": i}
        sets[f"g{i}"], datas[f"g{i}"] = set_bytes(info, **spec)
    config = make_config(tmp_path, max_batch_size=len(specs), max_wait_ms=3000.0, request_timeout=20.0)
    async with serve(config, backbone) as (app, c):
        for task, data in datas.items():
            assert (await upload(c, task, data)).status_code == 201
        images = {task: image_bytes(seed=40 + i) for i, task in enumerate(sets)}
        responses = await classify_each(c, images)
        for task, r in responses.items():
            assert r.status_code == 200, r.text
            assert_matches(r.json()["predictions"], reference_probs(backbone, sets[task], images[task]))
        assert state_of(app).worker.batches == 1
