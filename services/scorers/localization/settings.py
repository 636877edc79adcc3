"""Settings of the localization scorer: env prefix ``SPR_LOCALIZATION_``, config table ``[localization]``."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.images import ImageLimits
from services.common.settings import GrpcServerSettings
from services.scorers.settings import ScorerStageSettings


class GroundingBackend(StrEnum):
    """How phrases are grounded."""

    TORCH = "torch"  # Grounding DINO or OWLv2 through transformers (the model type decides)
    ONNX = "onnx"  # a folder exported by spr-export-onnx, on onnxruntime


class LocalizationSettings(GrpcServerSettings):
    """Everything the localization scorer service and stage read at start."""

    model_config = SettingsConfigDict(env_prefix="SPR_LOCALIZATION_")

    port: int = Field(default=50081, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(default=9481, ge=0, le=65535, description="Prometheus metrics port.")
    backend: GroundingBackend = Field(default=GroundingBackend.TORCH, description="torch or onnx.")
    model: str = Field(
        default="IDEA-Research/grounding-dino-tiny",
        description="Checkpoint (hub id or folder; Grounding DINO or OWLv2), or the ONNX export folder.",
    )
    model_version: str = Field(default="", description="Version in the lineage; '' = config hash.")
    device: str = Field(default="cpu", description="Torch device of the torch backend.")
    threads: int = Field(default=0, ge=0, description="onnxruntime intra-op threads; 0 = default.")
    box_threshold: float = Field(default=0.35, ge=0, le=1, description="Least score of a grounded box.")
    max_boxes_per_phrase: int = Field(default=3, ge=1, description="Grounded boxes kept per phrase.")
    iou_floor: float | None = Field(default=None, ge=0, le=1, description="Floor IoUs below this to 0.")
    precision_weight: float = Field(default=0.0, ge=0, le=1, description="Weight of the precision term.")
    max_candidates: int = Field(default=32, ge=1, description="Most candidates per request.")
    max_phrases_per_candidate: int = Field(default=16, ge=1, description="Phrases grounded per candidate.")
    images: ImageLimits = Field(default_factory=ImageLimits, description="Image limits.")
    stage: ScorerStageSettings = Field(default_factory=ScorerStageSettings, description="Kafka stage.")
