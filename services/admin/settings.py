"""Settings of the admin service: env prefix ``SPR_ADMIN_``, config table ``[admin]``.

Lists are comma-separated or JSON (``SPR_ADMIN_REPLICA_METRICS_URLS=http://a:8002/metrics,http://b:8002/metrics``);
``SPR_ADMIN_STAGES`` and ``SPR_ADMIN_EVAL_GATE_TOLERANCES`` are JSON. ``python -m services.admin
--help-env`` lists every setting.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.common.kafka_io import KafkaSettings
from services.common.settings import GrpcServerSettings
from services.common.topics import (
    DEAD_LETTER_SUFFIX,
    DESCRIPTIONS,
    PAIRS,
    REGIONS,
    SCORES_LOCALIZATION,
    SCORES_SEMANTIC,
)


class StageSpec(BaseModel):
    """One stage of the stream: its consumer group, the topics it reads, where its failures go."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str = Field(min_length=1, description="Name shown in PipelineStats (e.g. 'describer').")
    group_id: str = Field(min_length=1, description="The stage's Kafka consumer group.")
    topics: tuple[str, ...] = Field(min_length=1, description="Topics the group consumes.")
    dead_letter_topics: tuple[str, ...] = Field(
        default=(),
        description="Dead-letter topics counted for the stage; empty = '<topic>.dlq' of each input topic.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_dead_letters(cls, data: object) -> object:
        # The convention of services.common.topics.dead_letter_topic: named after the source topic.
        if isinstance(data, dict) and not data.get("dead_letter_topics") and data.get("topics"):
            topics = data["topics"]
            topics = [topics] if isinstance(topics, str) else topics
            return {**data, "dead_letter_topics": [f"{topic}{DEAD_LETTER_SUFFIX}" for topic in topics]}
        return data


#: The stream of SPEC §3. Group names of stages not built yet are placeholders the stages must adopt.
DEFAULT_STAGES: tuple[StageSpec, ...] = (
    StageSpec(stage="describer", group_id="spr-describer", topics=(REGIONS,)),
    StageSpec(stage="localization", group_id="spr-localization", topics=(DESCRIPTIONS,)),
    StageSpec(stage="semantic", group_id="spr-semantic", topics=(DESCRIPTIONS,)),
    StageSpec(
        stage="pair_builder",
        group_id="spr-pair-builder",
        topics=(DESCRIPTIONS, SCORES_LOCALIZATION, SCORES_SEMANTIC),
        dead_letter_topics=(PAIRS + DEAD_LETTER_SUFFIX,),  # the builder dead-letters to pairs.dlq
    ),
    StageSpec(stage="trainer", group_id="spr-trainer", topics=(PAIRS,)),
)

#: Metric -> largest drop (absolute; higher is better) allowed against the alias's current version.
DEFAULT_EVAL_GATE: dict[str, float] = {"eval_preference_accuracy": 0.01, "eval_reward_margin": 0.05}


def fail_fast(kafka: KafkaSettings) -> dict[str, Any]:
    """kafka-python client overrides so that an unreachable broker fails an RPC within its timeout.

    Its clients otherwise wait 30 s (``bootstrap_timeout_ms``) for a first connection.
    """
    return {"bootstrap_timeout_ms": kafka.request_timeout_ms}


def fail_fast_producer(kafka: KafkaSettings) -> dict[str, Any]:
    """:func:`fail_fast` for a producer: a send fails after about one request timeout, not 2 minutes."""
    timeout = kafka.request_timeout_ms
    return {**fail_fast(kafka), "max_block_ms": timeout, "delivery_timeout_ms": timeout + 1000}


class AdminSettings(GrpcServerSettings):
    """Everything the admin service reads at start."""

    model_config = SettingsConfigDict(env_prefix="SPR_ADMIN_")

    port: int = Field(default=50071, ge=0, le=65535, description="gRPC port; 0 picks a free port (tests).")
    metrics_port: int = Field(default=9471, ge=0, le=65535, description="Prometheus metrics port.")

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated."
    )
    api_version: str | None = Field(
        default=None, description="Pin the Kafka protocol version, e.g. '2.0' (noida); unset = negotiate."
    )
    kafka_request_timeout_ms: int = Field(
        default=10_000,
        ge=1000,
        description="Timeout of one Kafka request (offsets, produce, metadata) and of a first connection.",
    )
    topic_sync_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest wait to read the `adapters` topic up to its end."
    )
    adapter_store: str = Field(
        default=".spr/adapters",
        description="Adapter store root (a directory or file:// URI), as the trainer's.",
    )
    base_model_id: str = Field(
        default="",
        description="When set, versions trained on another base model are refused (as replicas refuse them).",
    )
    replica_metrics_urls: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Triton /metrics URLs of the policy replicas, comma-separated; they tell what is loaded.",
    )
    scrape_timeout_s: float = Field(default=2.0, gt=0, description="Timeout of one replica metrics scrape.")
    gated_aliases: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("stable",), description="Aliases that only move to versions passing the eval gate."
    )
    eval_gate_tolerances: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EVAL_GATE),
        description="JSON {metric: tolerance}: each manifest metric must be present and not lower than "
        "the gated alias's current version's by more than its tolerance.",
    )
    rate_window_s: float = Field(
        default=60.0, gt=0, description="Window over which records_per_second of each stage is measured."
    )
    stages: tuple[StageSpec, ...] = Field(
        default=DEFAULT_STAGES,
        description="JSON list of {stage, group_id, topics, dead_letter_topics} for PipelineStats.",
    )

    @field_validator("replica_metrics_urls", "gated_aliases", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("replica_metrics_urls")
    @classmethod
    def _http_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"replica metrics URL {url!r} must be http(s)://host:port/metrics")
        return value

    @field_validator("eval_gate_tolerances")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(name for name, tolerance in value.items() if not tolerance >= 0)
        if bad:
            raise ValueError(f"eval gate tolerances must be >= 0: {', '.join(bad)}")
        return value

    def kafka(self) -> KafkaSettings:
        """The shared Kafka client settings (the admin joins no consumer group)."""
        version = tuple(int(p) for p in self.api_version.split(".")) if self.api_version else None
        return KafkaSettings(
            bootstrap_servers=self.bootstrap_servers,
            client_id="spr-admin",
            api_version=version,
            request_timeout_ms=self.kafka_request_timeout_ms,
        )
