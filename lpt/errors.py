"""Typed errors with machine-readable codes.

A leaf module: it imports nothing from the project, so every layer (core, store, service,
trainer) can raise and catch the same errors, and the service maps them to HTTP in one place.
"""

from __future__ import annotations


class LptError(Exception):
    """Base error. ``code`` is stable and machine-readable; ``field`` names the offending input part.

    Args:
        code: short snake_case identifier clients can branch on.
        message: human-readable explanation.
        field: the field, tensor or parameter that is wrong, when there is one.
    """

    code: str = "lpt_error"

    def __init__(self, code: str | None = None, message: str = "", field: str | None = None):
        self.code = code or type(self).code
        self.message = message or self.code
        self.field = field
        super().__init__(f"{self.code}: {self.message}" + (f" (field: {field})" if field else ""))

    def to_dict(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {"code": self.code, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class PromptSetInvalid(LptError):
    """The bytes are not a valid ``lpt-prompt-set/1`` file for this backbone."""

    code = "invalid_prompt_set"


class BackboneError(LptError):
    """The backbone cannot be created or loaded, or is not a supported ViT."""

    code = "backbone_error"


class InvalidId(LptError):
    """An identifier the caller chose is malformed: a task or tenant id, or a version number."""

    code = "invalid_id"


class InvalidTaskId(InvalidId):
    """A task id does not match ``lpt.ids.ID_PATTERN``."""

    code = "invalid_task_id"


class InvalidTenantId(InvalidId):
    """A tenant id does not match ``lpt.ids.ID_PATTERN``."""

    code = "invalid_tenant_id"


class InvalidVersion(InvalidId):
    """A version is not a positive integer."""

    code = "invalid_version"


class NotFound(LptError):
    """A task or version does not exist (or belongs to another tenant: the answer is the same)."""

    code = "not_found"


class TooLarge(LptError):
    """A payload exceeds its configured size limit."""

    code = "too_large"


class StoreUnavailable(LptError):
    """The prompt store cannot be reached (timeout, connection refused, paused)."""

    code = "store_unavailable"


class StoreCorrupt(LptError):
    """Stored bytes fail their sha256/size check: the store holds a damaged blob. Retrying cannot help."""

    code = "store_corrupt"


class QuotaExceeded(LptError):
    """An upload would take a tenant past one of its quotas; nothing was stored.

    The error names the limit (``field``: the setting, e.g. ``max_bytes_per_tenant``), its value, the tenant's
    current use and what the upload would add, in the message and as numbers in ``to_dict``.

    Args:
        message: human-readable explanation.
        limit: the setting that would be exceeded.
        allowed: the setting's value.
        used: the tenant's use now, in the limit's unit (tasks or bytes).
        requested: what the upload would add, in the same unit.
    """

    code = "quota_exceeded"

    def __init__(self, message: str, limit: str, allowed: int, used: int, requested: int):
        super().__init__(None, message, limit)
        self.allowed = allowed
        self.used = used
        self.requested = requested

    def to_dict(self) -> dict[str, str | int]:
        return super().to_dict() | {"limit": self.allowed, "used": self.used, "requested": self.requested}


class VersionConflict(LptError):
    """A restored version number already exists with different bytes (import into a non-empty store)."""

    code = "version_conflict"
