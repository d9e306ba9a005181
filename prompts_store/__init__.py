"""Durable, versioned, tenant-namespaced storage of prompt-set bytes (Redis or embedded SQLite)."""

from prompts_store.base import ChangeEvent, PromptStore, StoredBlob, StoredVersion, Subscription
from prompts_store.factory import open_store

__all__ = ["ChangeEvent", "PromptStore", "StoredBlob", "StoredVersion", "Subscription", "open_store"]
