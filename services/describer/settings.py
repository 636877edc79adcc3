"""Settings of the describer: env prefix ``SPR_DESCRIBER_``, config table ``[describer]``.

Nested groups use ``__``: ``SPR_DESCRIBER_RETRY__MAX_ATTEMPTS=5``, ``SPR_DESCRIBER_SAMPLING__TOP_P=0.95``,
``SPR_DESCRIBER_IMAGES__MAX_PIXELS=...``, ``SPR_DESCRIBER_STAGE__BOOTSTRAP_SERVERS=host:9092``.
``python -m services.describer --help-env`` lists every setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, FilePath, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.common.images import ImageLimits
from services.common.kafka_io import KafkaSettings
from services.common.settings import GrpcServerSettings
from services.common.stage_runner import RunnerSettings
from services.describer.families import (
    FAMILIES,
    ModelFamily,
    PromptKind,
    PromptTemplate,
    get_family,
    parse_prompt_kinds,
)


class RetryPolicy(BaseModel):
    """Retries of Triton calls that failed because Triton was unreachable (exponential backoff)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(default=4, ge=1, le=20, description="Attempts per request, the first included.")
    initial_backoff_s: float = Field(default=0.1, ge=0, description="Wait before the first retry.")
    max_backoff_s: float = Field(default=2.0, ge=0, description="Longest wait between two attempts.")
    multiplier: float = Field(default=2.0, ge=1, description="Backoff growth per attempt.")
    jitter: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Random +- fraction of each wait, so replicas do not retry in step.",
    )

    def backoff_s(self, retry: int) -> float:
        """Nominal wait before retry number ``retry`` (0 = the first retry), without jitter."""
        return float(min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry))


class SamplingDefaults(BaseModel):
    """Sampling used where a request leaves a field at 0 (SPEC §2: N = 8, T 0.7–1.0, top-p 0.9)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_samples: int = Field(default=8, ge=1, description="N descriptions per region.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(default=0.9, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(default=256, ge=1, description="Tokens generated per description.")


class TemplateSpec(BaseModel):
    """An extra prompt template from the configuration (SPEC: templates are configurable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    template_id: str
    mode: PromptKind
    text: str

    def build(self) -> PromptTemplate:
        """The template object (checks the placeholders of its mode)."""
        return PromptTemplate(self.template_id, self.mode, self.text)


class StageSettings(RunnerSettings):
    """The Kafka stage ``regions`` -> ``descriptions`` (run with ``python -m services.describer.stage``).

    Transport settings (bootstrap servers, batching, in-flight bound, retries, drain) are the shared
    :class:`~services.common.stage_runner.RunnerSettings`.
    """

    group_id: str = Field(default="spr-describer", description="Consumer group of the stage.")
    regions_topic: str = Field(default="regions", description="Topic of common_pb2.Region records.")
    descriptions_topic: str = Field(default="descriptions", description="Topic the DescriptionRecords go to.")
    dead_letter_topic: str = Field(default="regions.dlq", description="Failed input records.")
    batch_size: int = Field(default=8, ge=1, description="Most records in one batch.")
    concurrency: int = Field(
        default=4, ge=1, description="Records described at once (Triton batches concurrent requests)."
    )
    adapter: str = Field(
        default="",
        description="Adapter (version or alias such as 'latest') the stage samples from; '' = base model.",
    )
    prompt_modes: Annotated[tuple[PromptKind, ...], NoDecode] = Field(
        default=(PromptKind.CROP, PromptKind.CROP_REFS, PromptKind.FULL_BOX),
        min_length=1,
        description="Prompt modes the stage rotates through, picked per region id (diversified prompts).",
    )
    metrics_port: int = Field(
        default=9462, ge=0, le=65535, description="Metrics port of the stage process (the server uses 9461)."
    )

    @field_validator("prompt_modes", mode="before")
    @classmethod
    def _split_modes(cls, value: object) -> object:
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return parse_prompt_kinds(value)
        return value

    def kafka(self, client_id: str = "spr-describer") -> KafkaSettings:
        """The shared Kafka client settings."""
        return super().kafka(client_id)


class DescriberSettings(GrpcServerSettings):
    """Everything the describer service and stage read at start."""

    model_config = SettingsConfigDict(env_prefix="SPR_DESCRIBER_")

    port: int = Field(default=50061, ge=0, le=65535, description="gRPC port; 0 picks a free port (tests).")
    metrics_port: int = Field(default=9461, ge=0, le=65535, description="Prometheus metrics port.")

    triton_url: str = Field(default="127.0.0.1:8001", description="Triton gRPC endpoint, host:port.")
    triton_ssl: bool = Field(default=False, description="Speak TLS to Triton (system roots).")
    triton_reconnect_backoff_s: float = Field(
        default=1.0, gt=0, description="Longest wait of the Triton channel between reconnection attempts."
    )
    model_name: str = Field(default="spr_policy", description="Triton model of the policy.")
    model_version: str = Field(default="", description="Triton model version; '' = Triton's policy.")
    policy_model_id: str = Field(
        default="Qwen/Qwen2.5-VL-7B-Instruct", description="Base policy model id recorded in the lineage."
    )
    model_family: str = Field(
        default="qwen2.5-vl", description=f"Prompt/coordinate family of the policy: {', '.join(FAMILIES)}."
    )
    default_prompt_mode: PromptKind = Field(
        default=PromptKind.CROP, description="Mode of requests that name neither a mode nor a template."
    )
    default_templates: dict[PromptKind, str] = Field(
        default_factory=dict,
        description="Default template id per mode (JSON object); unset = the family's v1.",
    )
    extra_templates: tuple[TemplateSpec, ...] = Field(
        default=(), description="More templates, JSON list of {template_id, mode, text}."
    )
    templates_file: FilePath | None = Field(
        default=None, description="JSON file with a list of extra templates (same shape as extra_templates)."
    )
    min_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Smart-resize lower bound; unset = processor_config, else the family's.",
    )
    max_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Smart-resize upper bound; unset = processor_config, else the family's.",
    )
    processor_config: FilePath | None = Field(
        default=None,
        description="The policy's processor_config.json / preprocessor_config.json: pixel bounds are read "
        "from it, so that the describer resizes exactly as the processor in Triton.",
    )
    image_format: str = Field(
        default="PNG",
        pattern="^(PNG|JPEG)$",
        description="Encoding of the frame sent to Triton (PNG is lossless).",
    )
    max_num_samples: int = Field(default=16, ge=1, description="Largest N a request may ask for.")
    max_generation_length: int = Field(
        default=1024, ge=1, description="Largest sampling.max_new_tokens a request may ask for."
    )
    sampling: SamplingDefaults = Field(
        default_factory=SamplingDefaults,
        description="Defaults of request fields left at 0 (SPR_DESCRIBER_SAMPLING__NUM_SAMPLES, ...).",
    )
    images: ImageLimits = Field(
        default_factory=ImageLimits,
        description="Image limits (SPR_DESCRIBER_IMAGES__MAX_PIXELS, __MAX_BYTES, __ALLOWED_ROOTS, ...).",
    )
    retry: RetryPolicy = Field(
        default_factory=RetryPolicy,
        description="Retries while Triton is unreachable (SPR_DESCRIBER_RETRY__MAX_ATTEMPTS, ...).",
    )
    run_id: str = Field(default="", description="Recorded in the lineage; keeps replays apart.")
    stage: StageSettings = Field(
        default_factory=StageSettings,
        description="The Kafka stage (SPR_DESCRIBER_STAGE__BOOTSTRAP_SERVERS, __GROUP_ID, __ADAPTER, ...).",
    )

    @field_validator("model_family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"unknown model family {value!r}; known: {', '.join(FAMILIES)}")
        return value

    @model_validator(mode="after")
    def _check_describer(self) -> DescriberSettings:
        if self.sampling.num_samples > self.max_num_samples:
            raise ValueError("sampling.num_samples must not exceed max_num_samples")
        if self.sampling.max_new_tokens > self.max_generation_length:
            raise ValueError("sampling.max_new_tokens must not exceed max_generation_length")
        self.family()  # unknown family, bad templates or pixel bounds fail at start, not per request
        return self

    def family(self) -> ModelFamily:
        """The configured model family with its templates, defaults and pixel bounds applied."""
        base = get_family(self.model_family)
        extra = [spec.build() for spec in (*self.extra_templates, *self._file_templates())]
        family = base.with_templates(extra, self.default_templates)
        min_pixels, max_pixels = self.min_pixels, self.max_pixels
        if self.processor_config is not None:
            file_min, file_max = read_pixel_bounds(self.processor_config)
            min_pixels = file_min if min_pixels is None else min_pixels
            max_pixels = file_max if max_pixels is None else max_pixels
        return family.with_pixel_bounds(min_pixels, max_pixels)

    def _file_templates(self) -> list[TemplateSpec]:
        if self.templates_file is None:
            return []
        raw = json.loads(self.templates_file.read_text(encoding="utf-8"))
        if not isinstance(raw, list):
            raise ValueError(f"{self.templates_file} must hold a JSON list of templates")
        return [TemplateSpec.model_validate(item) for item in raw]


def read_pixel_bounds(path: Path) -> tuple[int | None, int | None]:
    """``(min_pixels, max_pixels)`` of a Qwen-VL processor config (either file layout), None if absent.

    ``processor_config.json`` nests the image processor under ``image_processor``; both spell the
    bounds as ``min_pixels``/``max_pixels`` or as ``size: {shortest_edge, longest_edge}`` (pixels).
    """
    data: Any = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    image_processor = data.get("image_processor", data)
    size = image_processor.get("size") or {}
    min_pixels = image_processor.get("min_pixels", size.get("shortest_edge"))
    max_pixels = image_processor.get("max_pixels", size.get("longest_edge"))
    return (
        None if min_pixels is None else int(min_pixels),
        None if max_pixels is None else int(max_pixels),
    )


def processor_config_of(model_dir: Path) -> Path | None:
    """The processor config file a saved policy folder carries (what ``processor_config`` wants)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (model_dir / name).is_file():
            return model_dir / name
    return None
