"""Fixtures for the service acceptance tests (issue 4). Helpers are in ``service_helpers.py``."""

from __future__ import annotations

import pytest

from lpt.backbone import Backbone, load_backbone


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    """One frozen test_vit (32 px) for the whole session; read-only."""
    return load_backbone("test_vit", "random:0", img_size=32)
