"""The ``lpt-prompt-set/1`` format: a safetensors file with four tensors and string metadata.

Tensors (float32; float16 and bfloat16 accepted):

- ``shared_prompt`` ``[depth, L, D]``
- ``group_prompts`` ``[P, depth - S, L, D]`` and ``group_keys`` ``[P, D]`` (both absent, or P = 0, for plain VPT)
- ``head.weight`` ``[C, D]``

Metadata: ``format``, ``backbone``, ``backbone_fingerprint``, ``share_blocks``, ``top_k``, ``head_scale``,
``class_names`` (JSON list); optionally ``backbone_input_size`` (JSON list ``[3, H, W]``, so a mismatch can be
named) and ``temperature`` (the set's calibration: scores are ``softmax(logits / T)``; a set without it scores
with T = 1); any other key is kept verbatim in ``PromptSet.extra``.

Decoding never unpickles: the 8-byte header length and the JSON header are checked by hand before
safetensors touches the bytes, so pickles, zips, truncated files and header bombs fail fast with a code.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field

import safetensors.torch
import torch
from safetensors.torch import load as parse_safetensors  # parses a JSON header + raw buffers; never unpickles

from lpt.backbone import BackboneInfo, describe_mismatch, mismatched_field
from lpt.errors import PromptSetInvalid

FORMAT = "lpt-prompt-set/1"
TENSOR_NAMES = ("shared_prompt", "group_prompts", "group_keys", "head.weight")
REQUIRED_META = ("format", "backbone", "backbone_fingerprint", "share_blocks", "top_k", "head_scale", "class_names")
OPTIONAL_META = ("backbone_input_size", "temperature")
ALLOWED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_HEADER_LIMIT = 16 * 1024 * 1024
# s in logits = s * cos(feature, w_c): the cosine head's scale when a set does not say otherwise.
DEFAULT_HEAD_SCALE = 20.0
# T in scores = softmax(logits / T), for a set that stores no temperature (uncalibrated: the raw softmax).
DEFAULT_TEMPERATURE = 1.0
# The temperatures a set may carry: a fitted T far outside means the fit or the set is broken (T -> 0 turns scores
# into one-hot votes, a large T into a uniform spread), and the range bounds what one tenant's file can do to scores.
TEMPERATURE_RANGE = (0.05, 20.0)
# The largest prompt set a store accepts and a service uploads by default (a set is ~1% of the backbone).
MAX_PROMPT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ValidationLimits:
    """Bounds that keep one tenant's prompt set from costing the service unbounded memory or compute."""

    max_classes: int = 8192
    max_class_name_chars: int = 256
    max_prompt_length: int = 64
    max_pool_size: int = 256


@dataclass
class PromptSet:
    """One task's trainable LPT parameters plus what is needed to check and serve them."""

    shared_prompt: torch.Tensor
    head_weight: torch.Tensor
    class_names: list[str]
    backbone: str
    backbone_fingerprint: str
    share_blocks: int
    top_k: int = 1
    head_scale: float = DEFAULT_HEAD_SCALE
    group_prompts: torch.Tensor | None = None
    group_keys: torch.Tensor | None = None
    extra: dict[str, str] = field(default_factory=dict)
    backbone_input_size: tuple[int, ...] | None = None
    temperature: float | None = None

    @property
    def depth(self) -> int:
        return self.shared_prompt.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.shared_prompt.shape[1]

    @property
    def embed_dim(self) -> int:
        return self.shared_prompt.shape[2]

    @property
    def pool_size(self) -> int:
        return 0 if self.group_prompts is None else self.group_prompts.shape[0]

    @property
    def num_classes(self) -> int:
        return self.head_weight.shape[0]

    @property
    def score_temperature(self) -> float:
        """T of the served scores ``softmax(logits / T)``: the calibrated temperature, else ``DEFAULT_TEMPERATURE``."""
        return DEFAULT_TEMPERATURE if self.temperature is None else float(self.temperature)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"shared_prompt": self.shared_prompt, "head.weight": self.head_weight}
        if self.pool_size:
            out["group_prompts"] = self.group_prompts
            out["group_keys"] = self.group_keys
        return out

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def metadata(self) -> dict[str, str]:
        meta = dict(self.extra)
        meta.update(
            format=FORMAT,
            backbone=self.backbone,
            backbone_fingerprint=self.backbone_fingerprint,
            share_blocks=str(int(self.share_blocks)),
            top_k=str(int(self.top_k)),
            head_scale=repr(float(self.head_scale)),
            class_names=json.dumps(list(self.class_names), ensure_ascii=False),
        )
        if self.backbone_input_size is not None:
            meta["backbone_input_size"] = json.dumps([int(v) for v in self.backbone_input_size])
        if self.temperature is not None:
            meta["temperature"] = repr(float(self.temperature))
        return meta

    def backbone_identity(self) -> dict[str, object]:
        """The backbone the set was trained on, in ``BackboneInfo.to_dict()`` keys (for ``describe_mismatch``)."""
        size = list(self.backbone_input_size) if self.backbone_input_size is not None else None
        return {"name": self.backbone, "fingerprint": self.backbone_fingerprint, "input_size": size}


def encode(prompt_set: PromptSet) -> bytes:
    """Serialise to safetensors bytes (CPU, contiguous, detached); equal sets give equal bytes."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in prompt_set.tensors().items()}
    return _canonical_header(safetensors.torch.save(tensors, metadata=prompt_set.metadata()))


def _canonical_header(data: bytes) -> bytes:
    """Rewrite the JSON header with sorted keys: safetensors emits metadata in hash-map order, which
    would give the same set a different sha256 on every call (and break idempotent re-uploads)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keep the tensor data 8-byte aligned, as the format asks
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bad(code: str, message: str, field_name: str | None = None) -> PromptSetInvalid:
    return PromptSetInvalid(code, message, field_name)


# Signatures of what people upload by mistake, so the answer says what was received.
_SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (torch.save checkpoints are ZIP archives)"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x80", "a Python pickle"),
    (b"{", "a JSON document"),
    (b"<", "an HTML or XML document"),
)


def sniff(data: bytes) -> str | None:
    """What bytes that are not safetensors look like (e.g. "a JPEG image"), when a signature tells; else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WebP image"
    for magic, what in _SIGNATURES:
        if data.startswith(magic):
            return what
    head = data[:64]
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "a text file"
    return None


def _not_safetensors(data: bytes, detail: str) -> PromptSetInvalid:
    """Says what the bytes look like when it can tell; asked only once the container check has failed, so a
    real safetensors file whose header length happens to begin like a signature is never misjudged."""
    what = sniff(data)
    if what is not None:
        return _bad("not_safetensors", f"this looks like {what}, not a safetensors prompt set ({FORMAT})")
    return _bad("not_safetensors", f"not a safetensors file: {detail}")


def _json(raw: bytes | str, what: str, field: str | None) -> object:
    """JSON from an untrusted part; JSON nested deeper than the parser's recursion limit is refused like any other
    bad value (code ``nested_json``), not left to crash the caller."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise _bad("nested_json", f"{what} nests JSON too deeply", field) from exc


def _read_header(data: bytes) -> dict:
    if len(data) < 8:
        raise _not_safetensors(data, f"{len(data)} bytes is too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _HEADER_LIMIT or n > len(data) - 8:
        raise _not_safetensors(
            data,
            f"its first 8 bytes declare a {n}-byte header, but the file has {len(data)} bytes "
            f"(and a header is at most {_HEADER_LIMIT})",
        )
    raw = data[8 : 8 + n]
    if not raw.lstrip().startswith(b"{"):
        raise _not_safetensors(data, "the header is not a JSON object (pickle, zip or another format?)")
    try:
        header = _json(raw, "the header", None)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad("not_safetensors", f"the header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _bad("not_safetensors", "the header is not a JSON object")
    return header


def _int_meta(meta: dict[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except ValueError as exc:
        raise _bad("bad_metadata", f"{key} must be an integer, got {meta[key]!r}", key) from exc


def decode(data: bytes) -> PromptSet:
    """Parse safetensors bytes into a PromptSet, checking the container and metadata (not the backbone).

    Raises:
        PromptSetInvalid: with a code naming what is wrong and the field.
    """
    header = _read_header(data)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _bad("bad_metadata", "safetensors metadata must map strings to strings", "__metadata__")
    for name, entry in header.items():
        if name not in TENSOR_NAMES:
            raise _bad("unknown_tensor", f"unexpected tensor {name!r}; allowed: {', '.join(TENSOR_NAMES)}", name)
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in ALLOWED_DTYPES:
            raise _bad("bad_dtype", f"{name} has dtype {dtype}; allowed: float32, float16, bfloat16", name)
    try:
        tensors = parse_safetensors(data)
    except Exception as exc:  # SafetensorError: truncated data, overlapping offsets, bad shapes
        raise _bad("not_safetensors", f"corrupt safetensors data: {exc}") from exc

    if meta.get("format") != FORMAT:
        raise _bad("bad_format", f"format must be {FORMAT!r}, got {meta.get('format')!r}", "format")
    for key in REQUIRED_META:
        if key not in meta:
            raise _bad("missing_metadata", f"metadata {key!r} is required", key)
    for name in ("shared_prompt", "head.weight"):
        if name not in tensors:
            raise _bad("missing_tensor", f"tensor {name!r} is required", name)
    if ("group_prompts" in tensors) != ("group_keys" in tensors):
        missing = "group_keys" if "group_prompts" in tensors else "group_prompts"
        raise _bad("missing_tensor", "group_prompts and group_keys come together", missing)
    try:
        class_names = _json(meta["class_names"], "class_names", "class_names")
    except json.JSONDecodeError as exc:
        raise _bad("bad_metadata", f"class_names is not JSON: {exc}", "class_names") from exc
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise _bad("bad_metadata", "class_names must be a JSON list of strings", "class_names")
    try:
        head_scale = float(meta["head_scale"])
    except ValueError as exc:
        raise _bad("bad_metadata", f"head_scale must be a number, got {meta['head_scale']!r}", "head_scale") from exc
    input_size = _input_size_meta(meta)
    temperature = _temperature_meta(meta)
    pool = tensors.get("group_prompts")
    if pool is not None and pool.ndim >= 1 and pool.shape[0] == 0:
        pool = None
    return PromptSet(
        shared_prompt=tensors["shared_prompt"],
        head_weight=tensors["head.weight"],
        class_names=class_names,
        backbone=meta["backbone"],
        backbone_fingerprint=meta["backbone_fingerprint"],
        share_blocks=_int_meta(meta, "share_blocks"),
        top_k=_int_meta(meta, "top_k"),
        head_scale=head_scale,
        group_prompts=pool,
        group_keys=tensors["group_keys"] if pool is not None else None,
        extra={k: v for k, v in meta.items() if k not in REQUIRED_META + OPTIONAL_META},
        backbone_input_size=input_size,
        temperature=temperature,
    )


def _input_size_meta(meta: dict[str, str]) -> tuple[int, ...] | None:
    raw = meta.get("backbone_input_size")
    if raw is None:
        return None
    try:
        size = _json(raw, "backbone_input_size", "backbone_input_size")
    except json.JSONDecodeError:
        size = None
    if not (isinstance(size, list) and len(size) == 3 and all(type(v) is int and v > 0 for v in size)):
        message = f"backbone_input_size must be a JSON list [C, H, W], got {raw!r}"
        raise _bad("bad_metadata", message, "backbone_input_size")
    return tuple(size)


def _temperature_meta(meta: dict[str, str]) -> float | None:
    raw = meta.get("temperature")
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError as exc:
        raise _bad("bad_metadata", f"temperature must be a number, got {raw!r}", "temperature") from exc


def _validate_temperature(temperature: float | None) -> None:
    if temperature is None:
        return
    low, high = TEMPERATURE_RANGE
    if not (math.isfinite(temperature) and low <= temperature <= high):
        message = f"temperature must be a finite number in [{low:g}, {high:g}], got {temperature}"
        raise _bad("bad_metadata", message, "temperature")


def _shape(t: torch.Tensor, name: str, ndim: int) -> None:
    if t.ndim != ndim:
        raise _bad("bad_shape", f"{name} must have {ndim} dimensions, got shape {list(t.shape)}", name)


def validate(ps: PromptSet, backbone: BackboneInfo, limits: ValidationLimits | None = None) -> None:
    """Check a prompt set against the backbone it will run on.

    Raises:
        PromptSetInvalid: the first problem found, with a code and the field.
    """
    limits = limits or ValidationLimits()
    _shape(ps.shared_prompt, "shared_prompt", 3)
    _shape(ps.head_weight, "head.weight", 2)
    depth, length, dim = ps.shared_prompt.shape
    if depth != backbone.depth:
        raise _bad("depth_mismatch", f"shared_prompt depth {depth} != backbone depth {backbone.depth}", "shared_prompt")
    if dim != backbone.embed_dim:
        raise _bad(
            "embed_dim_mismatch", f"shared_prompt width {dim} != backbone width {backbone.embed_dim}", "shared_prompt"
        )
    if not 1 <= length <= limits.max_prompt_length:
        raise _bad("bad_shape", f"prompt length {length} not in [1, {limits.max_prompt_length}]", "shared_prompt")
    differs = mismatched_field(backbone.to_dict(), ps.backbone_identity())
    if differs is not None:
        message = describe_mismatch(
            backbone.to_dict(), ps.backbone_identity(), "this backbone is", "the prompt set was trained on"
        )
        field_name = {"name": "backbone", "input_size": "backbone_input_size"}.get(differs, "backbone_fingerprint")
        raise _bad("fingerprint_mismatch", message, field_name)
    if not 0 <= ps.share_blocks < depth:
        raise _bad("bad_share_blocks", f"share_blocks {ps.share_blocks} not in [0, {depth})", "share_blocks")
    if not (math.isfinite(ps.head_scale) and ps.head_scale > 0):
        raise _bad("bad_metadata", f"head_scale must be a positive finite number, got {ps.head_scale}", "head_scale")
    _validate_temperature(ps.temperature)
    if ps.head_weight.shape[1] != dim:
        raise _bad("bad_shape", f"head.weight is {list(ps.head_weight.shape)}, expected [C, {dim}]", "head.weight")
    num_classes = ps.head_weight.shape[0]
    if num_classes < 2:
        raise _bad("too_few_classes", f"a classifier needs at least 2 classes, got {num_classes}", "head.weight")
    if num_classes > limits.max_classes:
        raise _bad("too_many_classes", f"{num_classes} classes exceeds the limit {limits.max_classes}", "head.weight")
    if len(ps.class_names) != num_classes:
        raise _bad(
            "class_count_mismatch", f"{len(ps.class_names)} class_names for {num_classes} head rows", "class_names"
        )
    if any(len(c) > limits.max_class_name_chars for c in ps.class_names):
        raise _bad("bad_metadata", f"a class name exceeds {limits.max_class_name_chars} characters", "class_names")
    if ps.pool_size:
        _validate_pool(ps, limits)
    elif ps.group_keys is not None and ps.group_keys.numel():
        raise _bad("missing_tensor", "group_keys without group_prompts", "group_prompts")
    for name, tensor in ps.tensors().items():
        if not bool(torch.isfinite(tensor.float()).all()):
            raise _bad("non_finite", f"{name} contains NaN or Inf", name)


def _validate_pool(ps: PromptSet, limits: ValidationLimits) -> None:
    pool, keys = ps.group_prompts, ps.group_keys
    if keys is None:
        raise _bad("missing_tensor", "group_prompts without group_keys", "group_keys")
    _shape(pool, "group_prompts", 4)
    _shape(keys, "group_keys", 2)
    depth, length, dim = ps.shared_prompt.shape
    size = pool.shape[0]
    expected = [size, depth - ps.share_blocks, length, dim]
    if list(pool.shape) != expected:
        raise _bad(
            "bad_shape",
            f"group_prompts is {list(pool.shape)}, expected {expected} ([P, depth - share_blocks, L, D])",
            "group_prompts",
        )
    if list(keys.shape) != [size, dim]:
        raise _bad("bad_shape", f"group_keys is {list(keys.shape)}, expected {[size, dim]}", "group_keys")
    if size > limits.max_pool_size:
        raise _bad("bad_shape", f"pool size {size} exceeds the limit {limits.max_pool_size}", "group_prompts")
    if not 1 <= ps.top_k <= size:
        raise _bad("bad_top_k", f"top_k {ps.top_k} not in [1, {size}]", "top_k")


def load_and_validate(data: bytes, backbone: BackboneInfo, limits: ValidationLimits | None = None) -> PromptSet:
    """decode + validate: what every entry point that accepts a prompt set from outside calls."""
    ps = decode(data)
    validate(ps, backbone, limits)
    return ps
