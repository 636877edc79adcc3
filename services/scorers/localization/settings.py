"""Settings of the localization scorer: env prefix ``SPR_LOCALIZATION_``, config table ``[localization]``."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, FilePath, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.images import ImageLimits
from services.common.settings import GrpcServerSettings
from services.describer.families import FAMILIES, ModelFamily, get_family
from services.describer.settings import RetryPolicy, read_pixel_bounds
from services.scorers.settings import ScorerStageSettings


class GroundingBackend(StrEnum):
    """How phrases are grounded."""

    TORCH = "torch"  # Grounding DINO or OWLv2 through transformers (the model type decides)
    ONNX = "onnx"  # a folder exported by spr-export-onnx, on onnxruntime
    MLLM = "mllm"  # the policy MLLM served by Triton grounds each phrase itself


class MllmGrounding(BaseModel):
    """The MLLM-as-grounder backend (``SPR_LOCALIZATION_MLLM__TRITON_URL``, ...)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    triton_url: str = Field(default="127.0.0.1:8001", description="Triton gRPC endpoint, host:port.")
    triton_model: str = Field(default="spr_policy", description="Triton model of the policy.")
    family: str = Field(
        default="qwen2.5-vl", description=f"Prompt/coordinate family of the policy: {', '.join(FAMILIES)}."
    )
    template: str = Field(
        default="", description="Grounding instruction with {phrase}; '' = the family's template."
    )
    adapter: str = Field(default="", description="Policy adapter (version or alias); '' = the base model.")
    max_new_tokens: int = Field(default=64, ge=1, description="Tokens generated per grounding answer.")
    min_pixels: int | None = Field(
        default=None, ge=1, description="Smart-resize lower bound (as the describer)."
    )
    max_pixels: int | None = Field(
        default=None, ge=1, description="Smart-resize upper bound (as the describer)."
    )
    processor_config: FilePath | None = Field(
        default=None,
        description="The policy's processor config: pixel bounds are read from it, so that the frame the "
        "grounder sends is exactly the one the processor in Triton sees.",
    )
    max_batch_size: int = Field(
        default=16, ge=1, description="Triton's max_batch_size of the model (requests per generate)."
    )
    reconnect_backoff_s: float = Field(default=1.0, gt=0, description="Longest Triton reconnect wait.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="Retries while Triton is down.")

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"unknown model family {value!r}; known: {', '.join(FAMILIES)}")
        return value

    def model_family(self) -> ModelFamily:
        """The policy's family with the pixel bounds of its processor (settings first, then the file)."""
        min_pixels, max_pixels = self.min_pixels, self.max_pixels
        if self.processor_config is not None:
            file_min, file_max = read_pixel_bounds(self.processor_config)
            min_pixels = file_min if min_pixels is None else min_pixels
            max_pixels = file_max if max_pixels is None else max_pixels
        return get_family(self.family).with_pixel_bounds(min_pixels, max_pixels)


class LocalizationSettings(GrpcServerSettings):
    """Everything the localization scorer service and stage read at start."""

    model_config = SettingsConfigDict(env_prefix="SPR_LOCALIZATION_")

    port: int = Field(default=50081, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(default=9481, ge=0, le=65535, description="Prometheus metrics port.")
    backend: GroundingBackend = Field(default=GroundingBackend.TORCH, description="torch, onnx or mllm.")
    model: str = Field(
        default="IDEA-Research/grounding-dino-tiny",
        description="Checkpoint (hub id or folder; Grounding DINO or OWLv2), the ONNX export folder, or "
        "(mllm) the policy model id recorded in the scorer id.",
    )
    model_version: str = Field(default="", description="Version in the lineage; '' = config hash.")
    device: str = Field(default="cpu", description="Torch device of the torch backend.")
    threads: int = Field(default=0, ge=0, description="onnxruntime intra-op threads; 0 = default.")
    onnx_int8: bool = Field(
        default=False, description="Run the int8 (dynamically quantized) graph of the onnx export."
    )
    box_threshold: float = Field(default=0.35, ge=0, le=1, description="Least score of a grounded box.")
    max_boxes_per_phrase: int = Field(default=3, ge=1, description="Grounded boxes kept per phrase.")
    iou_floor: float | None = Field(default=None, ge=0, le=1, description="Floor IoUs below this to 0.")
    precision_weight: float = Field(default=0.0, ge=0, le=1, description="Weight of the precision term.")
    max_candidates: int = Field(default=32, ge=1, description="Most candidates per request.")
    max_phrases_per_candidate: int = Field(default=16, ge=1, description="Phrases grounded per candidate.")
    mllm: MllmGrounding = Field(default_factory=MllmGrounding, description="The mllm backend.")
    images: ImageLimits = Field(default_factory=ImageLimits, description="Image limits.")
    stage: ScorerStageSettings = Field(default_factory=ScorerStageSettings, description="Kafka stage.")
