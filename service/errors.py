"""Service-level errors (leaf module). Each maps to exactly one HTTP status in ``api/routes.py``."""

from __future__ import annotations

from lpt.errors import LptError


class Unauthorized(LptError):
    code = "unauthorized"


class QueueFull(LptError):
    """The bounded request queue is full: the client should retry later (429)."""

    code = "queue_full"


class DeadlineExceeded(LptError):
    """The request waited past its deadline (504)."""

    code = "deadline_exceeded"


class BatchFailed(LptError):
    """The forward pass that carried this request failed; every request in the batch gets this (500)."""

    code = "batch_failed"


class BadImage(LptError):
    """The image cannot be decoded or is not acceptable (4xx; ``status`` says which)."""

    code = "bad_image"

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(code, message, "image")
        self.status = status


class BadRequest(LptError):
    """A malformed request (bad content type, multipart, parameters)."""

    code = "bad_request"


class ShuttingDown(LptError):
    """The service is draining and accepts no new work (503)."""

    code = "shutting_down"
