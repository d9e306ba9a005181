"""Fixtures of the integration tests; the app harness is ``tests/support/service_app.py``, the backbone fixture is
in ``tests/conftest.py``."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
