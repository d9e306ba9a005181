"""Configuration: every setting of ``lpt-serve`` is declared once, as a field of the frozen ``ServiceConfig``.

From that one declaration come the ``LPT_*`` environment variables (``ServiceSettings``, a pydantic-settings
model generated from the fields), the command-line flags with their help and defaults (``service/cli.py``
generates them from the settings) and the typed, frozen config that flows inward. Nothing below the edge reads
the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lpt.host_memory import RETAIN_BYTES
from lpt.prompt_set import MAX_PROMPT_BYTES, ValidationLimits
from prompts_store import Quotas, check_spec
from service.auth import KEY_VARIABLES, InvalidKeys, check_api_keys, merge_keys, parse_keys, read_keys_file, secrets_of

ENV_PREFIX = "LPT_"
# The demo runs offline: a seeded DeiT-Tiny unless a backbone is chosen explicitly.
DEMO_BACKBONE = ("deit_tiny_patch16_224", "random:0")


def setting(default: Any, help: str, unset: str | None = None) -> Any:
    """A setting's default and help; ``unset`` says what a ``None`` default resolves to (shown by ``--help``)."""
    return field(default=default, metadata={"help": help, "unset": unset})


@dataclass(frozen=True)
class ServiceConfig:
    """Every knob of ``lpt-serve``, declared once: flag ``--max-batch-size`` and variable ``LPT_MAX_BATCH_SIZE``
    come from the field ``max_batch_size`` (``ServiceSettings`` below). Frozen, it flows inward; ``store``,
    ``device``, ``replica_id`` and ``decode_threads`` are resolved when unset, and ``api_keys`` holds the parsed
    keys (tenant -> secret)."""

    host: str = setting("127.0.0.1", "bind address")
    port: int = setting(8000, "TCP port (0: any free port)")
    grpc_port: int = setting(8001, "TCP port of the Open Inference Protocol over gRPC (0: off)")
    backbone: str = setting("vit_base_patch16_224.augreg_in21k", "timm model name")
    backbone_weights: str = setting("hub", "'hub', a weights file path, or 'random:SEED'")
    img_size: int | None = setting(None, "input size, when not the model's default", unset="the model's own")
    store: str | None = setting(
        None,
        "a Redis URL (redis://, rediss://, unix://, redis+sentinel://, redis+cluster://, rediss+...; docs/store.md) "
        "or a path for the embedded store",
        unset="DATA_DIR/store",
    )
    data_dir: Path = setting(Path("data"), "directory for the embedded store and the demo files")  # noqa: RUF009
    device: str | None = setting(None, "cuda, cuda:N or cpu", unset="cuda when available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "compute dtype (auto: bfloat16 on cuda, float32 on cpu)"
    )
    max_batch_size: int = setting(32, "images per forward")
    max_wait_ms: float = setting(5.0, "milliseconds a batch stays open after its first image")
    queue_size: int = setting(1024, "images waiting at most before 429")
    tenant_queue_share: float = setting(0.5, "share of the queue one tenant may fill (with API keys)")
    cache_bytes: int = setting(2 * 1024**3, "device bytes for resident prompt sets")
    pin_loaded_models: bool = setting(
        False, "a model repository 'load' (Open Inference Protocol) also holds the set against eviction until 'unload'"
    )
    request_timeout: float = setting(10.0, "seconds before a classify answers 504")
    header_timeout: float = setting(10.0, "seconds a connection may take to send a request's headers (then closed)")
    body_timeout: float = setting(20.0, "seconds a request may take to send its body (then 408)")
    max_connections: int = setting(1024, "open connections at most; past it new requests answer 503")
    max_concurrent_uploads: int = setting(4, "prompt-set uploads read at once at most; past it 429")
    max_image_bytes: int = setting(10 * 1024 * 1024, "largest encoded image in bytes")
    max_image_pixels: int = setting(40_000_000, "largest width*height of an image")
    decode_threads: int | None = setting(None, "threads decoding request images", unset="one per CPU core")
    decode_tenant_pixels: int = setting(
        160_000_000, "image pixels one tenant may have waiting or decoding at once; past it 429 (default 4 x 40 MP)"
    )
    decode_niceness: int = setting(
        5, "how far below the batch loop's CPU priority the decode threads run (Linux; 0: the same)"
    )
    host_memory_retain_bytes: int = setting(
        RETAIN_BYTES, "freed host memory the allocator keeps instead of returning it (glibc; 0: its defaults)"
    )
    max_prompt_bytes: int = setting(MAX_PROMPT_BYTES, "largest prompt set upload in bytes")
    max_classes: int = setting(ValidationLimits.max_classes, "largest class count a prompt set may have")
    api_keys: dict[str, tuple[str, ...]] = field(
        default_factory=dict, repr=False, metadata={"help": "tenant -> its secrets (LPT_API_KEYS parsed)"}
    )
    api_keys_file: Path | None = setting(  # noqa: RUF009 (setting() returns a dataclass field)
        None, "file of 'tenant:secret' lines ('#' comments); re-read when it changes or on SIGHUP", unset="none"
    )
    insecure: bool = setting(False, "allow a non-loopback address without API keys")
    demo: bool = setting(
        False, f"install a demo task; backbone {DEMO_BACKBONE[0]} with {DEMO_BACKBONE[1]} weights unless one is chosen"
    )
    access_log: bool = setting(False, "log one line per HTTP request (on by default with --demo)")
    log_level: str = setting("info", "debug, info, warning or error")
    store_timeout: float = setting(0.5, "seconds a store call may take before the store counts as unavailable")
    reconcile_s: float = setting(2.0, "seconds between re-reads of the store's state (recovers missed notices)")
    max_tasks_per_tenant: int | None = setting(
        None, "tasks one tenant may hold; an upload creating one more answers 403", unset="no limit"
    )
    max_bytes_per_tenant: int | None = setting(
        None, "bytes of prompt sets one tenant may store, every version kept included; past it 403", unset="no limit"
    )
    keep_inactive_versions: int | None = setting(
        None,
        "inactive versions a task keeps; an upload deletes older ones (never the one active before it)",
        unset="all",
    )
    unready_after_failures: int = setting(
        3, "failed batches in a row after which /readyz answers 503 (traffic moves to other replicas; 0: never)"
    )
    unhealthy_after_failures: int = setting(
        20, "failed batches in a row after which /healthz answers 503 (the orchestrator restarts it; 0: never)"
    )
    shutdown_timeout: float = setting(20.0, "seconds to finish in-flight work on SIGTERM")
    replica_id: str | None = setting(None, "this replica's name in the X-LPT-Replica header", unset="HOST:PORT")

    def __post_init__(self) -> None:
        # Resolved here, so a config built directly (tests, benchmarks) means what the same settings mean to lpt-serve.
        resolved = {
            "store": self.store or str(Path(self.data_dir) / "store"),
            "device": self.device or _default_device(),
            "replica_id": self.replica_id or f"{self.host}:{self.port}",
            "decode_threads": self.decode_threads or _cpu_cores(),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "api_keys", secrets_of(self.api_keys))  # one secret per tenant reads as a tuple
        check_spec(self.store)  # an unknown store scheme stops the start here, before anything is created
        self.quotas  # noqa: B018 (checks the three quota settings)
        if self.cache_bytes < self.max_prompt_bytes:
            raise ValueError(
                f"--cache-bytes ({self.cache_bytes}) is smaller than --max-prompt-bytes ({self.max_prompt_bytes}): "
                "a set that may be uploaded could never stay resident; raise the one or lower the other"
            )

    @property
    def quotas(self) -> Quotas:
        """The store's per-tenant limits and retention."""
        return Quotas(self.max_tasks_per_tenant, self.max_bytes_per_tenant, self.keep_inactive_versions)

    @property
    def single_tenant(self) -> bool:
        return not self.api_keys and self.api_keys_file is None

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
        assert self.device is not None  # resolved in __post_init__
        return "bfloat16" if self.device.startswith("cuda") else "float32"

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback without keys, unless explicitly insecure."""
        if not self.single_tenant or self.insecure or _is_loopback(self.host):
            return
        raise SystemExit(
            f"refusing to listen on {self.host} without API keys: set LPT_API_KEYS / --api-keys-file, "
            "bind to 127.0.0.1, or pass --insecure"
        )


def _cpu_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's CPU set), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def env_name(field_name: str) -> str:
    """The environment variable of a setting (``max_batch_size`` -> ``LPT_MAX_BATCH_SIZE``)."""
    return ENV_PREFIX + field_name.upper()


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ServiceConfig))


class _SettingsBase(BaseSettings):
    """What only the edge knows: the API keys as given inline, and ``--demo``'s defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    api_keys: str | None = Field(
        None,
        description="'tenant:secret' pairs, comma-separated; prefer the variable or a file (a flag shows in ps)",
        json_schema_extra={"unset": "none: single-tenant"},
    )

    @model_validator(mode="after")
    def _demo_defaults(self) -> _SettingsBase:
        """``--demo`` changes the defaults of what was not set: the offline backbone and the access log."""
        if not self.demo:
            return self
        chosen = self.model_fields_set
        if "backbone" not in chosen:
            self.backbone = DEMO_BACKBONE[0]
            if "backbone_weights" not in chosen:
                self.backbone_weights = DEMO_BACKBONE[1]
        if "access_log" not in chosen:
            self.access_log = True
        return self

    def freeze(self) -> ServiceConfig:
        """The frozen config: the same values, with the API keys parsed (inline and file together)."""
        values = {name: getattr(self, name) for name in CONFIG_FIELDS}
        try:
            inline = parse_keys((self.api_keys or "").split(","))
            # Refused here, before the backbone loads, with the rule the authenticator applies.
            check_api_keys(merge_keys(inline, read_keys_file(self.api_keys_file)) if self.api_keys_file else inline)
            return ServiceConfig(**values | {"api_keys": inline})
        except InvalidKeys as exc:
            raise SystemExit(str(exc)) from None
        except OSError as exc:
            raise SystemExit(f"{KEY_VARIABLES}: cannot read the keys file: {exc}") from None
        except ValueError as exc:  # settings that contradict each other: one clear line, before anything loads
            raise SystemExit(f"lpt-serve: invalid settings: {exc}") from None


def _settings_field(f: dataclasses.Field, annotation: Any) -> tuple[Any, Any]:
    """The pydantic field of a config field: its type, default, help and what unset means."""
    unset = f.metadata.get("unset")
    extra = {"unset": unset} if unset else None
    return annotation, Field(f.default, description=f.metadata["help"], json_schema_extra=extra)


# The environment and flag layer, generated from the config's fields: each is an ``LPT_*`` variable (a flag wins).
ServiceSettings = create_model(
    "ServiceSettings",
    __base__=_SettingsBase,
    __module__=__name__,
    **{
        f.name: _settings_field(f, hints[f.name])
        for hints in [typing.get_type_hints(ServiceConfig)]
        for f in dataclasses.fields(ServiceConfig)
        if f.name != "api_keys"
    },
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
