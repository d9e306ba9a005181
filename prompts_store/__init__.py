"""Durable, versioned, tenant-namespaced storage of prompt-set bytes (Redis or embedded SQLite)."""

from prompts_store.base import (
    ChangeEvent,
    PromptStore,
    Quotas,
    StoredBlob,
    StoredVersion,
    Subscription,
    TaskState,
    TenantUsage,
)
from prompts_store.factory import check_spec, open_store

__all__ = [
    "ChangeEvent",
    "PromptStore",
    "Quotas",
    "StoredBlob",
    "StoredVersion",
    "Subscription",
    "TaskState",
    "TenantUsage",
    "check_spec",
    "open_store",
]
