"""Every Prometheus metric of the service, defined once. Names are a contract for dashboards.

No per-task labels (tasks are unbounded); ``endpoint`` and ``status`` come from fixed sets.
Each app gets its own registry so several apps (tests, replicas in one process) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lpt_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "lpt_request_duration_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "lpt_queue_wait_seconds", "Time a classify request waits for its batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("lpt_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tasks = Histogram(
            "lpt_batch_tasks", "Distinct tasks per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_duration = Histogram(
            "lpt_inference_duration_seconds", "Forward pass wall time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("lpt_queue_depth", "Images waiting for a batch", registry=r)
        self.cache_hits = Counter(
            "lpt_prompt_cache_hits", "Prompt-set lookups served from the device cache", registry=r
        )
        self.cache_misses = Counter(
            "lpt_prompt_cache_misses", "Prompt-set lookups that loaded from the store", registry=r
        )
        self.cache_evictions = Counter(
            "lpt_prompt_cache_evictions", "Prompt sets evicted from the device cache", registry=r
        )
        self.cache_resident = Gauge("lpt_prompt_cache_resident_sets", "Prompt sets resident on the device", registry=r)
        self.cache_bytes = Gauge("lpt_prompt_cache_bytes", "Device bytes held by resident prompt sets", registry=r)
        self.load_duration = Histogram(
            "lpt_prompt_load_duration_seconds",
            "Cache-miss load: store read, validation, copy to device",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter("lpt_store_errors", "Prompt store operations that failed (unavailable)", registry=r)
        self.store_corrupt = Counter(
            "lpt_store_corrupt", "Prompt-set reads whose bytes failed their sha256 check in the store", registry=r
        )
        self.batch_failures = Counter(
            "lpt_batch_failures",
            "Batches failed with all their requests, by stage (forward, the loop around it, or a probe forward)",
            ["stage"],
            registry=r,
        )
        self.consecutive_batch_failures = Gauge(
            "lpt_consecutive_batch_failures",
            "Batches failed in a row since the last good one (readiness and liveness fail past their settings)",
            registry=r,
        )
        for stage in (
            "forward",
            "loop",
            "probe",
        ):  # exported at 0 from the start, so rates and alerts need no special case
            self.batch_failures.labels(stage)
        self.device_memory = Gauge(
            "lpt_device_memory_bytes", "Device memory allocated by this process (CUDA)", registry=r
        )
        self.backbone_info = Gauge(
            "lpt_backbone_info", "Backbone loaded (value 1)", ["name", "fingerprint"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
