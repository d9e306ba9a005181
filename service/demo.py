"""The offline demo: a seeded prompt set installed as task ``demo``, plus sample files for the README's curls."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lpt.errors import NotFound
from lpt.init import init_prompt_set
from lpt.prompt_set import encode
from service.auth import DEFAULT_TENANT

if TYPE_CHECKING:
    from service.application import Service

log = logging.getLogger(__name__)

DEMO_TASK = "demo"
DEMO_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def install_demo(state: Service) -> None:
    """Install task ``demo`` for every tenant unless present; write ``demo.safetensors`` and ``demo.jpg``."""
    info = state.backbone.info
    ps = init_prompt_set(
        info, DEMO_CLASSES, prompt_length=10, pool_size=8, share_blocks=info.depth // 2, top_k=2, seed=0
    )
    ps.extra["demo"] = "seeded random prompt set: predictions are not meaningful"
    data = encode(ps)
    out = state.config.data_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.safetensors").write_bytes(data)
    _demo_image().save(out / "demo.jpg", quality=90)
    tenants = state.auth.tenants or [DEFAULT_TENANT]
    for tenant in tenants:
        try:
            state.store.active_version(tenant, DEMO_TASK)
            continue
        except NotFound:
            pass
        stored = state.store.put(
            tenant, DEMO_TASK, data, {"num_classes": str(ps.num_classes), "num_params": str(ps.num_params)}
        )
        log.info("installed demo task %r for tenant %r (version %d)", DEMO_TASK, tenant, stored.version)
    log.info("demo files: %s, %s", out / "demo.safetensors", out / "demo.jpg")


def _demo_image(size: int = 256) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([x, y, 1 - (x + y) / 2], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8), mode="RGB")
