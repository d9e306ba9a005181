"""Identifier checks. A task or tenant id is never used in a key or path before passing these."""

from __future__ import annotations

import re

from lpt.errors import InvalidTaskId, InvalidTenantId

# The one rule for task and tenant ids (they become key prefixes and path parts); ASCII only.
ID_PATTERN = "^[a-z0-9][a-z0-9._-]{0,63}$"
ID_MAX_LENGTH = 64
_ID = re.compile(ID_PATTERN.strip("^$"))


def check_task_id(task: str) -> str:
    """Return ``task`` if it matches ``^[a-z0-9][a-z0-9._-]{0,63}$`` (ASCII only), else raise InvalidTaskId."""
    if not isinstance(task, str) or not _ID.fullmatch(task) or not task.isascii():
        shown = task[:80] if isinstance(task, str) else type(task).__name__
        raise InvalidTaskId(message=f"task id {shown!r} must match {ID_PATTERN}", field="task")
    return task


def check_tenant_id(tenant: str) -> str:
    """Tenants follow the same rule as tasks (they become key prefixes)."""
    if not isinstance(tenant, str) or not _ID.fullmatch(tenant) or not tenant.isascii():
        raise InvalidTenantId(message=f"tenant id {tenant!r} must match {ID_PATTERN}", field="tenant")
    return tenant
