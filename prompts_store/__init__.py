"""Durable, versioned, tenant-namespaced storage of prompt-set bytes (Redis or embedded SQLite)."""

from prompts_store.base import ChangeEvent, PromptStore, StoredBlob, StoredVersion, Subscription, TaskState
from prompts_store.factory import open_store

__all__ = ["ChangeEvent", "PromptStore", "StoredBlob", "StoredVersion", "Subscription", "TaskState", "open_store"]
