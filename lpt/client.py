"""A small HTTP client for lpt-serve (used by the ``lpt`` CLI and the trainer's ``--push``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from lpt.errors import LptError


class ApiError(LptError):
    """An error answer from the service: ``status`` plus the service's code and message."""

    code = "api_error"

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(code, message, field)
        self.status = status


class LptClient:
    """Talks to one lpt-serve base URL.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: bearer secret of the tenant (None in single-tenant mode).
        timeout: seconds per request.
        transport: an httpx transport (tests pass the ASGI app's).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> LptClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                raise ApiError(response.status_code, err.get("code", "error"), err.get("message", ""), err.get("field"))
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, "http_error", response.text[:200]) from None
        return response.json()

    def backbone(self) -> dict:
        return self._call("GET", "/v1/backbone")

    def push_prompt_set(self, task: str, data: bytes) -> dict:
        """Upload safetensors bytes as a new version of ``task`` (it becomes active)."""
        return self._call(
            "POST",
            "/v1/prompts",
            params={"task": task},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    def tasks(self) -> list[dict]:
        return self._call("GET", "/v1/prompts")["tasks"]

    def show(self, task: str) -> dict:
        return self._call("GET", f"/v1/prompts/{task}")

    def rollback(self, task: str, version: int) -> dict:
        return self._call("POST", f"/v1/prompts/{task}/activate", params={"version": version})

    def delete(self, task: str) -> dict:
        return self._call("DELETE", f"/v1/prompts/{task}")

    def classify(self, task: str, images: Sequence[bytes], top_k: int = 5, version: int | None = None) -> list[dict]:
        """Predictions for each image, in order (one request; multipart when there are several)."""
        params: dict[str, Any] = {"task": task, "top_k": top_k}
        if version is not None:
            params["version"] = version
        if len(images) == 1:
            out = self._call(
                "POST",
                "/v1/classify",
                params=params,
                content=images[0],
                headers={"Content-Type": "application/octet-stream"},
            )
            return [{"task": out["task"], "version": out["version"], "predictions": out["predictions"]}]
        files = [("image", (f"image{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
        out = self._call("POST", "/v1/classify", params=params, files=files)
        return [{"task": out["task"], "version": out["version"], **r} for r in out["results"]]
