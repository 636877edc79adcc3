"""Settings shared by both scorers: the Kafka stage and the common request limits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from services.common.kafka_io import KafkaSettings
from services.common.topics import DEAD_LETTER_SUFFIX, DESCRIPTIONS


class ScorerStageSettings(BaseModel):
    """The Kafka stage ``descriptions`` -> ``scores.*`` of one scorer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap servers.")
    group_id: str = Field(default="", description="Consumer group; '' = spr-<scorer>.")
    descriptions_topic: str = Field(default=DESCRIPTIONS, description="Topic of DescriptionRecords.")
    scores_topic: str = Field(default="", description="Output topic; '' = the scorer's scores.* topic.")
    dead_letter_topic: str = Field(default="", description="Failed records; '' = descriptions.dlq.")
    batch_size: int = Field(default=4, ge=1, description="Records per poll (one region per record).")
    retry_backoff_s: float = Field(default=2.0, ge=0, description="Pause before retrying a record.")
    request_timeout_s: float = Field(default=120.0, gt=0, description="Deadline of one region's scoring.")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Stage metrics port; 0 = server's + 1.")

    def kafka(self, client_id: str) -> KafkaSettings:
        """The shared Kafka client settings."""
        return KafkaSettings(bootstrap_servers=self.bootstrap_servers, client_id=client_id)

    def dead_letters(self) -> str:
        """The dead-letter topic name."""
        return self.dead_letter_topic or DESCRIPTIONS + DEAD_LETTER_SUFFIX
