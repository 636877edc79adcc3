"""Settings shared by both scorers: the Kafka stage and the common request limits."""

from __future__ import annotations

from pydantic import Field

from services.common.stage_runner import RunnerSettings
from services.common.topics import DEAD_LETTER_SUFFIX, DESCRIPTIONS


class ScorerStageSettings(RunnerSettings):
    """The Kafka stage ``descriptions`` -> ``scores.*`` of one scorer.

    Transport settings (bootstrap servers, batching, in-flight bound, retries, drain) are the shared
    :class:`~services.common.stage_runner.RunnerSettings`.
    """

    group_id: str = Field(default="", description="Consumer group; '' = spr-<scorer>.")
    descriptions_topic: str = Field(default=DESCRIPTIONS, description="Topic of DescriptionRecords.")
    scores_topic: str = Field(default="", description="Output topic; '' = the scorer's scores.* topic.")
    dead_letter_topic: str = Field(default="", description="Failed records; '' = descriptions.dlq.")
    batch_size: int = Field(default=4, ge=1, description="Most records in one batch (one region each).")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Stage metrics port; 0 = server's + 1.")

    def dead_letters(self) -> str:
        """The dead-letter topic name."""
        return self.dead_letter_topic or DESCRIPTIONS + DEAD_LETTER_SUFFIX
