"""Configuration: the environment (``LPT_*``) and flags are read here, once, into a frozen ServiceConfig."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

from lpt.ids import check_tenant_id

DEFAULT_TENANT = "default"


class ServiceSettings(BaseSettings):
    """Every knob of ``lpt-serve``; each is also a flag of the same name (``--max-batch-size``)."""

    model_config = SettingsConfigDict(env_prefix="LPT_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    backbone: str = "vit_base_patch16_224.augreg_in21k"
    backbone_weights: str = "hub"
    img_size: int | None = None
    store: str | None = None
    data_dir: Path = Path("data")
    device: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 1024
    tenant_queue_share: float = 0.5
    cache_bytes: int = 2 * 1024**3
    request_timeout: float = 10.0
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_prompt_bytes: int = 64 * 1024 * 1024
    max_classes: int = 8192
    api_keys: str | None = None
    api_keys_file: Path | None = None
    insecure: bool = False
    demo: bool = False
    log_level: str = "info"
    store_timeout: float = 0.5
    reconcile_s: float = 2.0
    shutdown_timeout: float = 20.0
    replica_id: str | None = None

    def freeze(self) -> ServiceConfig:
        """Copy every setting the config shares by name, then resolve the few that need work."""
        shared = {f.name: getattr(self, f.name) for f in fields(ServiceConfig) if f.name in type(self).model_fields}
        return ServiceConfig(
            **shared
            | {
                "store": self.store or str(self.data_dir / "store"),
                "device": self.device or _default_device(),
                "api_keys": _parse_keys(self.api_keys, self.api_keys_file),
                "replica_id": self.replica_id or f"{self.host}:{self.port}",
            }
        )


@dataclass(frozen=True)
class ServiceConfig:
    """Frozen configuration that flows inward; nothing below the edge reads the environment."""

    host: str = "127.0.0.1"
    port: int = 8000
    backbone: str = "vit_base_patch16_224.augreg_in21k"
    backbone_weights: str = "hub"
    img_size: int | None = None
    store: str = "data/store"
    data_dir: Path = Path("data")
    device: str = "cpu"
    dtype: str = "auto"
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 1024
    tenant_queue_share: float = 0.5
    tenant_queue_share: float = 0.5
    cache_bytes: int = 2 * 1024**3
    request_timeout: float = 10.0
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_prompt_bytes: int = 64 * 1024 * 1024
    max_classes: int = 8192
    api_keys: dict[str, str] = field(default_factory=dict)
    insecure: bool = False
    demo: bool = False
    log_level: str = "info"
    store_timeout: float = 0.5
    reconcile_s: float = 2.0
    shutdown_timeout: float = 20.0
    replica_id: str = "local"

    @property
    def single_tenant(self) -> bool:
        return not self.api_keys

    @property
    def tenant_queue_size(self) -> int:
        """Places one tenant may hold in the queue (all of them when there is only one tenant)."""
        if self.single_tenant:
            return self.queue_size
        return max(1, int(self.queue_size * self.tenant_queue_share))

    @property
    def compute_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback without keys, unless explicitly insecure."""
        if self.api_keys or self.insecure or _is_loopback(self.host):
            return
        raise SystemExit(
            f"refusing to listen on {self.host} without API keys: set LPT_API_KEYS / --api-keys-file, "
            "bind to 127.0.0.1, or pass --insecure"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_keys(inline: str | None, path: Path | None) -> dict[str, str]:
    """``tenant:secret`` pairs, comma-separated (env) or one per line (file; ``#`` comments)."""
    pairs: list[str] = []
    if inline:
        pairs += [p for p in inline.split(",") if p.strip()]
    if path:
        lines = Path(path).read_text().splitlines()
        pairs += [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    keys: dict[str, str] = {}
    for pair in pairs:
        tenant, sep, secret = pair.strip().partition(":")
        if not sep or not secret:
            raise SystemExit("API keys must be 'tenant:secret' pairs (the secret is not shown here)")
        if len(secret) < 8:
            raise SystemExit(f"the API key of tenant {tenant!r} is shorter than 8 characters")
        keys[check_tenant_id(tenant)] = secret
    return keys


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
