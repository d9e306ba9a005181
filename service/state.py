"""Everything a request handler needs, wired once at start-up by ``app.create_app``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from lpt.backbone import Backbone
from lpt.errors import StoreUnavailable
from lpt.prompt_set import ValidationLimits
from prompts_store.base import PromptStore, Subscription
from service.auth import Authenticator
from service.engine import Engine
from service.images import DecodePool
from service.metrics import ServiceMetrics
from service.prompt_cache import PromptCache
from service.queue import FairQueue
from service.settings import ServiceConfig
from service.worker import EngineWorker

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServiceState:
    config: ServiceConfig
    backbone: Backbone
    store: PromptStore
    cache: PromptCache
    engine: Engine
    worker: EngineWorker
    queue: FairQueue
    metrics: ServiceMetrics
    auth: Authenticator
    decode_pool: DecodePool
    limits: ValidationLimits
    subscription: Subscription | None = None
    warmed_up: bool = False
    draining: bool = False
    _store_ok: tuple[float, bool] = field(default=(0.0, False))

    def store_call(self, fn: Callable[..., T], *args: Any) -> T:
        """Call the store, counting unavailability (the error itself maps to 503)."""
        try:
            return fn(*args)
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            raise

    def store_reachable(self, max_age_s: float = 1.0) -> bool:
        """Ping the store at most once per ``max_age_s`` (readiness probes can be frequent)."""
        checked, ok = self._store_ok
        if time.monotonic() - checked < max_age_s:
            return ok
        try:
            self.store.ping()
            ok = True
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            ok = False
        self._store_ok = (time.monotonic(), ok)
        return ok

    def refresh_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.queue))
        if self.engine.device.type == "cuda":
            self.metrics.device_memory.set(torch.cuda.memory_allocated(self.engine.device))
