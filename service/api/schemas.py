"""Request/response models: the served OpenAPI schema is generated from these."""

from __future__ import annotations

from pydantic import BaseModel, Field

from lpt.prompt_set import DEFAULT_TEMPERATURE


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable error code")
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Prediction(BaseModel):
    index: int
    label: str
    score: float = Field(
        description="the class's probability softmax(logits / T) under the task's calibrated temperature T "
        "(GET /v1/prompts/{task}): of the images scored 0.8, about 80 % are that class; T = 1 for a set without one"
    )


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
    temperature: float = Field(
        default=DEFAULT_TEMPERATURE,
        description="the active version's score temperature T: scores are softmax(logits / T), fitted by lpt-train "
        "on held-out images; 1.0 for a set that carries none",
    )
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
