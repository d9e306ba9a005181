"""Small real resident entries for unit tests of the lease table, the cache and the queue (no backbone)."""

from __future__ import annotations

import torch

from lpt.prompt_set import PromptSet
from prompts_store.base import StoredVersion
from service.metrics import ServiceMetrics
from service.resident import Lease, ResidentSet, ResidentTable, make_resident

SET_BYTES = 4 * (2 * 3 * 8 + 4 * 8)  # float32 shared prompt [2, 3, 8] + head [4, 8]


def tiny_set(seed: int = 0) -> PromptSet:
    """A pool-less set of ``SET_BYTES`` bytes: depth 2, L 3, D 8, 4 classes."""
    gen = torch.Generator().manual_seed(seed)
    return PromptSet(
        shared_prompt=torch.randn(2, 3, 8, generator=gen),
        head_weight=torch.randn(4, 8, generator=gen),
        class_names=[f"c{i}" for i in range(4)],
        backbone="tiny",
        backbone_fingerprint="0" * 64,
        share_blocks=1,
    )


def tiny_entry(task: str = "t", version: int = 1, tenant: str = "acme") -> ResidentSet:
    """A resident entry of ``tiny_set(version)`` on the CPU in float32."""
    info = StoredVersion(tenant, task, version, "0" * 64, SET_BYTES, 0.0)
    return make_resident(info, tiny_set(version), "cpu", torch.float32)


def tiny_lease(task: str = "t") -> Lease:
    """A lease on a real entry of a table of its own (for queue tests that need a lease, not a cache)."""
    _, (lease,) = ResidentTable(1 << 20, ServiceMetrics()).insert(tiny_entry(task), leases=1)
    return lease
