"""Request/response models: the served OpenAPI schema is generated from these."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable error code")
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Prediction(BaseModel):
    index: int
    label: str
    score: float = Field(description="softmax probability")


SHA256_FIELD = Field(
    description="sha256 of the prompt set's bytes that answered: tells apart two sets that claim one version"
)


class ClassifyResponse(BaseModel):
    task: str
    version: int
    sha256: str = SHA256_FIELD
    predictions: list[Prediction]


class ImageResult(BaseModel):
    predictions: list[Prediction]


class ClassifyBatchResponse(BaseModel):
    task: str
    version: int
    sha256: str = SHA256_FIELD
    results: list[ImageResult]


class VersionInfo(BaseModel):
    version: int
    sha256: str
    size: int
    created: float
    active: bool = False
    num_classes: int | None = None
    num_params: int | None = None


class PromptSetUploaded(BaseModel):
    task: str
    version: int
    new_version: bool = Field(description="false when the bytes equal the active version (answered 200, not 201)")
    sha256: str
    size: int
    created: float
    num_classes: int
    num_params: int
    pool_size: int
    prompt_length: int
    share_blocks: int
    top_k: int
    backbone_fingerprint: str


class TaskSummary(BaseModel):
    task: str
    active_version: int
    num_classes: int | None = None


class TaskList(BaseModel):
    tasks: list[TaskSummary]


class TaskDetail(BaseModel):
    task: str
    active_version: int
    class_names: list[str] | None = None
    versions: list[VersionInfo]


class Deleted(BaseModel):
    task: str
    deleted: bool


class BackboneResponse(BaseModel):
    name: str
    fingerprint: str
    depth: int
    embed_dim: int
    num_prefix_tokens: int
    num_patches: int
    patch_size: int
    input_size: list[int]
    mean: list[float]
    std: list[float]
    interpolation: str
    crop_pct: float
    weights: str
    random_weights: bool
    num_params: int
    prompt_set_format: str
    limits: dict[str, int]


class Health(BaseModel):
    status: str
    detail: dict[str, str | int | float | bool] = {}
