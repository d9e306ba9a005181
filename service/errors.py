"""Service-level errors and the one table that maps every typed error to its HTTP status (leaf module).

Each class answers exactly one status and carries a default code (and field), so a raise site states only its
message: ``raise QueueFull("12 images are waiting; retry shortly")``. A second code on the same status (two
ways an image can be unacceptable, say) is a ``code=`` at the raise site, never a second status.
"""

from __future__ import annotations

from typing import ClassVar

from lpt.errors import (
    InvalidId,
    LptError,
    NotFound,
    PromptSetInvalid,
    QuotaExceeded,
    StoreCorrupt,
    StoreUnavailable,
    TooLarge,
)


class ServiceError(LptError):
    """Base of the service's errors: ``status`` is the HTTP status of the class and every subclass.

    Args:
        message: human-readable explanation.
        field: the offending input part (default: the class's ``default_field``).
        code: only where one status has several codes (default: the class's ``code``).
    """

    status: ClassVar[int] = 500
    default_field: ClassVar[str | None] = None

    def __init__(self, message: str = "", field: str | None = None, *, code: str | None = None):
        super().__init__(code, message, field or self.default_field)


class BadRequest(ServiceError):
    """A malformed request (bad content type, multipart, parameters)."""

    status = 400
    code = "bad_request"


class BadImage(BadRequest):
    """The image bytes cannot be used: empty or undecodable."""

    code = "bad_image"
    default_field = "image"


class RequestTimeout(ServiceError):
    """The request body did not arrive within the body deadline (a client sending too slowly)."""

    status = 408
    code = "body_timeout"
    default_field = "body"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class ImageTooLarge(ServiceError):
    """The image exceeds the byte or pixel limit (checked before any pixel is decoded)."""

    status = 413
    code = "image_too_large"
    default_field = "image"


class UnsupportedMediaType(ServiceError):
    """The Content-Type is not an accepted image type."""

    status = 415
    code = "unsupported_media_type"
    default_field = "image"


class ImageRejected(ServiceError):
    """A decodable image the service will not run: absurd dimensions, or a polyglot file."""

    status = 422
    code = "bad_image_dimensions"
    default_field = "image"


class QueueFull(ServiceError):
    """The bounded request queue is full: the client should retry later."""

    status = 429
    code = "queue_full"


class BatchFailed(ServiceError):
    """The batch that carried this request failed (in the forward or around it); every request in it gets this."""

    status = 500
    code = "batch_failed"


class ShuttingDown(ServiceError):
    """The service is draining and accepts no new work."""

    status = 503
    code = "shutting_down"


class SetChanged(ServiceError):
    """The store no longer holds the bytes this replica expected for a version (it changed, or data was lost);
    the caller re-reads the task's state and retries once, so a client sees this only if it changes again."""

    status = 503
    code = "prompt_set_changed"


class DeadlineExceeded(ServiceError):
    """The request waited past its deadline."""

    status = 504
    code = "deadline_exceeded"


# The shared core's errors know nothing of HTTP; their statuses are stated here, once.
CORE_STATUS: dict[type[LptError], int] = {
    NotFound: 404,
    TooLarge: 413,
    InvalidId: 422,
    PromptSetInvalid: 422,
    QuotaExceeded: 403,  # the tenant's quota: retrying cannot help until it deletes something (no Retry-After)
    StoreCorrupt: 500,  # a damaged blob stays damaged: a server error, not a retryable 503
    StoreUnavailable: 503,
}
RETRY_AFTER_S = {429: "1", 503: "2"}


def http_status(exc: LptError) -> int:
    """The HTTP status of a typed error (500 for one the table does not know)."""
    if isinstance(exc, ServiceError):
        return exc.status
    return next((status for cls, status in CORE_STATUS.items() if isinstance(exc, cls)), 500)
