"""Settings of the pair builder: env prefix ``SPR_PAIRS_``, config table ``[pairs]``.

``python -m services.pairs --help-env`` lists every setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.kafka_io import KafkaSettings
from services.common.settings import SprSettings
from services.common.topics import (
    DEAD_LETTER_SUFFIX,
    DESCRIPTIONS,
    PAIRS,
    SCORES_LOCALIZATION,
    SCORES_SEMANTIC,
)
from services.core.pairs import DEFAULT_DELTA
from services.core.refine import REFINE_IOU_THRESHOLD
from services.core.scoring import DEFAULT_LAMBDA
from services.pairs.logic import PairRules


class PairBuilderSettings(SprSettings):
    """Everything the pair builder reads at start."""

    model_config = SettingsConfigDict(env_prefix="SPR_PAIRS_")

    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap servers.")
    api_version: str | None = Field(
        default=None, description="Pin the Kafka protocol version, e.g. '2.0.0'; unset = negotiate."
    )
    session_timeout_ms: int = Field(default=45_000, ge=1000, description="Consumer group session timeout.")
    heartbeat_interval_ms: int = Field(default=3_000, ge=100, description="Consumer heartbeat interval.")
    max_poll_interval_ms: int = Field(default=300_000, ge=1000, description="Longest gap between two polls.")
    group_id: str = Field(default="spr-pair-builder", description="Consumer group of the pair builder.")
    descriptions_topic: str = Field(default=DESCRIPTIONS, description="Topic of DescriptionRecords.")
    localization_topic: str = Field(default=SCORES_LOCALIZATION, description="Topic of localization scores.")
    semantic_topic: str = Field(default=SCORES_SEMANTIC, description="Topic of semantic scores.")
    pairs_topic: str = Field(default=PAIRS, description="Topic the PairDecisions go to.")
    dead_letter_topic: str = Field(
        default=PAIRS + DEAD_LETTER_SUFFIX,
        description="Input records that cannot be joined or decided (bad input, mismatch, timeout).",
    )
    partitions: int = Field(default=3, ge=1, description="Partition count shared by the stream topics.")
    retention_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=1, description="Retention of created topics.")
    ensure_topics: bool = Field(default=True, description="Create missing topics / check existing ones.")

    lambda_sem: float = Field(default=DEFAULT_LAMBDA, ge=0, le=1, description="S = λ·S_sem + (1 − λ)·S_loc.")
    delta: float = Field(default=DEFAULT_DELTA, ge=0, description="Least reward margin of a pair.")
    iou_floor: float | None = Field(default=None, ge=0, le=1, description="IoUs below it count as 0.")
    refine_iou: float = Field(
        default=REFINE_IOU_THRESHOLD,
        ge=0,
        lt=1,
        description="Refinement replaces a described box by the GT box it overlaps with IoU above this "
        "(SPEC and paper: 0.5). Lower it for a policy whose boxes rarely get that close.",
    )
    run_id: str = Field(default="", description="Part of every pair id and lineage; keeps replays apart.")

    timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="A region still missing records this long after its first one (while its input "
        "partitions are caught up) is dead-lettered and decided as SCORES_TIMED_OUT.",
    )
    decided_capacity: int = Field(
        default=200_000, ge=1, description="Decided region ids remembered to drop late records (LRU)."
    )
    seed_scan_records: int = Field(
        default=100_000,
        ge=0,
        description="On assignment, `pairs` records read to learn the decided regions when the broker "
        "kept no commit metadata (else the committed mark says where to start).",
    )
    check_crcs: bool = Field(
        default=True,
        description="Verify record CRCs on fetch. kafka-python computes CRC-32C in pure Python unless the "
        "`crc32c` package is installed, which costs the builder a tenth of its time.",
    )
    batch_size: int = Field(default=2000, ge=1, description="Most records per poll.")
    poll_timeout_ms: int = Field(default=200, ge=1, description="Longest wait of one poll.")
    produce_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Longest wait for the acknowledgement of the records sent since the last commit; "
        "then the builder starts new producers and re-reads from its commit point.",
    )
    commit_interval_s: float = Field(
        default=0.5, ge=0, description="Least time between two offset commits (0 = after every poll)."
    )

    metrics_enabled: bool = Field(default=True, description="Serve Prometheus metrics over HTTP at /metrics.")
    metrics_host: str = Field(default="127.0.0.1", description="Address of the metrics endpoint.")
    metrics_port: int = Field(default=9501, ge=0, le=65535, description="Metrics port; 0 picks a free one.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def needs_semantic(self) -> bool:
        """With λ = 0 the semantic score weighs nothing, so the join waits for it only when λ > 0."""
        return self.lambda_sem != 0

    def rules(self) -> PairRules:
        """The pair selection knobs."""
        return PairRules(
            lambda_sem=self.lambda_sem,
            delta=self.delta,
            iou_floor=self.iou_floor,
            refine_iou=self.refine_iou,
            run_id=self.run_id,
        )

    def kafka(self, client_id: str = "spr-pair-builder") -> KafkaSettings:
        """The shared Kafka client settings."""
        version = tuple(int(p) for p in self.api_version.split(".")) if self.api_version else None
        return KafkaSettings(
            bootstrap_servers=self.bootstrap_servers,
            client_id=client_id,
            api_version=version,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            max_poll_interval_ms=self.max_poll_interval_ms,
        )
