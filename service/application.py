"""The service below its front ends: built once from the frozen config, started and stopped by the app's lifespan.

``Service`` holds the two objects the front ends call (``classifier`` and ``prompt_sets``) and what the health
endpoints read (the batch loop's heartbeat, the store's reachability, the drain flag). Everything else is wired
inside those objects by ``Service.build``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from lpt.backbone import Backbone, load_backbone
from lpt.errors import StoreUnavailable
from lpt.forward import COMPUTE_DTYPES
from lpt.prompt_set import ValidationLimits
from prompts_store import open_store
from prompts_store.base import PromptStore
from service.auth import Authenticator, KeysFile
from service.classifier import Classifier
from service.decode_pool import DecodePool
from service.engine import Engine
from service.images import ImageDecoder
from service.metrics import ServiceMetrics
from service.prompt_cache import PromptCache
from service.prompt_sets import PromptSets
from service.queue import FairQueue
from service.resident import SetKey
from service.settings import ServiceConfig
from service.worker import EngineWorker

log = logging.getLogger(__name__)

STORE_PING_MAX_AGE_S = 1.0  # readiness probes can be frequent; the store is pinged at most this often


class Service:
    """One replica's service: classification, the prompt-set lifecycle, health.

    Args:
        config: the frozen settings.
        backbone: the frozen ViT, on its device.
        store: the prompt store (owned: closed by ``stop`` when ``owns_store``).
        owns_store: whether ``stop`` closes the store.
    """

    def __init__(self, config: ServiceConfig, backbone: Backbone, store: PromptStore, owns_store: bool = True):
        self.config = config
        self.backbone = backbone
        self.metrics = ServiceMetrics()
        self.auth = Authenticator(config.api_keys)
        self.keys_file = (
            None if config.api_keys_file is None else KeysFile(config.api_keys_file, config.api_keys, self.auth)
        )
        if self.keys_file is not None:
            self.auth.replace(self.keys_file.load())
        self.limits = ValidationLimits(max_classes=config.max_classes)
        self.draining = threading.Event()
        self.warmed_up = False
        self._owns_store = owns_store
        self._store_ok = (0.0, False)
        dtype = COMPUTE_DTYPES[config.compute_dtype]

        def cache(admit: Callable[[SetKey], bool]) -> PromptCache:
            return PromptCache(
                store, backbone.info, config.device, dtype, config.cache_bytes, self.metrics, self.limits,
                model=backbone.model, admit=admit,
            )  # fmt: skip

        self.prompt_sets = PromptSets(
            store,
            backbone.info,
            self.limits,
            config.max_prompt_bytes,
            self.metrics,
            cache,
            config.max_concurrent_uploads,
        )
        queue = FairQueue(config.queue_size, config.tenant_queue_size)
        self.engine = Engine(backbone, config.device, dtype)
        self.worker = EngineWorker(self.engine, queue, self.metrics, config.max_batch_size, config.max_wait_ms / 1000)
        decoder = ImageDecoder(backbone.eval_transform, config.max_image_bytes, config.max_image_pixels)
        decode_pool = DecodePool(decoder, config.decode_threads, config.decode_niceness, config.decode_tenant_pixels)
        self.classifier = Classifier(self.prompt_sets, queue, decode_pool, config.request_timeout, self.draining)
        self.metrics.backbone_info.labels(backbone.info.name, backbone.info.fingerprint[:16]).set(1)

    @classmethod
    def build(
        cls, config: ServiceConfig, backbone: Backbone | None = None, store: PromptStore | None = None
    ) -> Service:
        """Load what is not passed in (tests share one backbone and store) and wire the parts."""
        if backbone is None:
            backbone = load_backbone(config.backbone, config.backbone_weights, config.img_size)
        backbone.to(config.device)
        owns_store = store is None
        if store is None:
            store = open_store(
                config.store, max_bytes=config.max_prompt_bytes, timeout_s=config.store_timeout, quotas=config.quotas
            )
        return cls(config, backbone, store, owns_store)

    @property
    def store(self) -> PromptStore:
        return self.prompt_sets.store

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the batch loop, warm the forward up, then follow the store (blocking: call from a thread)."""
        self.worker.start()
        if self.keys_file is not None:
            self.keys_file.start()
        self.engine.warm_up()
        self.warmed_up = True
        self.prompt_sets.subscribe(self.config.reconcile_s)

    def stop(self) -> None:
        """Drain: refuse new work, finish what is queued (bounded by the shutdown timeout), release everything."""
        self.draining.set()
        if self.keys_file is not None:
            self.keys_file.close()
        self.worker.stop(self.config.shutdown_timeout)
        self.prompt_sets.close()
        self.classifier.decode_pool.close()
        if self._owns_store:
            self.store.close()

    def reload_keys(self) -> bool:
        """Read the keys file again now (SIGHUP); False when there is none or it was not applied."""
        return self.keys_file is not None and self.keys_file.reload()

    # -- health -----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """The batch loop runs, has ticked recently (a stalled loop fails liveness), and its batches do not all
        fail (a device stuck in an error state: a restart is the remedy)."""
        stalled = self.heartbeat_age >= max(5.0, 3 * self.config.request_timeout)
        return (
            self.worker.alive
            and not stalled
            and not _past(self.worker.failing_batches, self.config.unhealthy_after_failures)
        )

    @property
    def heartbeat_age(self) -> float:
        return time.monotonic() - self.worker.heartbeat

    def readiness(self) -> dict[str, bool | int]:
        """What /readyz reports; ``ready`` when warmed up, not draining, and the store (or the cache) can serve.
        Blocking (it may ping the store)."""
        store_ok = self.store_reachable()
        resident = len(self.prompt_sets.cache)
        failing = self.worker.failing_batches
        batches_ok = not _past(failing, self.config.unready_after_failures)
        ready = self.warmed_up and not self.draining.is_set() and (store_ok or resident > 0) and batches_ok
        return {
            "ready": ready,
            "warmed_up": self.warmed_up,
            "store": store_ok,
            "resident_sets": resident,
            "draining": self.draining.is_set(),
            "failing_batches": failing,
        }

    def store_reachable(self) -> bool:
        """Ping the store at most once per ``STORE_PING_MAX_AGE_S``."""
        checked, ok = self._store_ok
        if time.monotonic() - checked < STORE_PING_MAX_AGE_S:
            return ok
        try:
            self.store.ping()
            ok = True
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            ok = False
        self._store_ok = (time.monotonic(), ok)
        return ok

    def render_metrics(self) -> bytes:
        """The Prometheus exposition, with the gauges read at scrape time brought up to date."""
        self.metrics.queue_depth.set(len(self.classifier.queue))
        if self.engine.device.type == "cuda":
            self.metrics.device_memory.set(torch.cuda.memory_allocated(self.engine.device))
        return self.metrics.render()


def _past(count: int, limit: int) -> bool:
    """``count`` reached a failure limit (0 turns the limit off)."""
    return limit > 0 and count >= limit
