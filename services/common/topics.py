"""Every Kafka topic of the SPR stream, declared once (SPEC section 3, "Stream topology").

All stream topics are keyed by region id and share one partition count, so every record of a region
lands on the same partition number everywhere and the pair builder can join locally. `adapters` is
compacted: its keys are `version/<v>` and `alias/<name>`, so the topic always holds the current state
of every alias and every published version. Partition counts and retention come from settings at
start-up (`stream_topics(...)`); the names are the contract.
"""

from __future__ import annotations

from services.common.kafka_io import Topic
from spr.v1 import adapters_pb2, common_pb2, describer_pb2, pairs_pb2, scoring_pb2

REGIONS = "regions"
DESCRIPTIONS = "descriptions"
SCORES_LOCALIZATION = "scores.localization"
SCORES_SEMANTIC = "scores.semantic"
PAIRS = "pairs"
ADAPTERS = "adapters"
TRAINER_CONTROL = "trainer.control"
DEAD_LETTER_SUFFIX = ".dlq"


def adapters_topic(partitions: int = 1) -> Topic[adapters_pb2.AdapterEvent]:
    """Compacted: the latest event per key survives, i.e. the current state of the adapter world."""
    return Topic(
        ADAPTERS,
        adapters_pb2.AdapterEvent,
        partitions=partitions,
        config={"cleanup.policy": "compact"},
    )


def trainer_control_topic() -> Topic[adapters_pb2.TrainingTrigger]:
    """On-demand training requests (Admin TriggerTraining -> the long-running trainer), keyed by trigger id.

    One partition keeps requests in order; a week's retention lets a trainer that was down act on what
    was asked meanwhile (it commits each request after the round it started).
    """
    return Topic(
        TRAINER_CONTROL,
        adapters_pb2.TrainingTrigger,
        partitions=1,
        config={"retention.ms": str(7 * 24 * 3600 * 1000)},
    )


def stream_topics(partitions: int = 3, retention_ms: int = 7 * 24 * 3600 * 1000) -> dict[str, Topic]:  # type: ignore[type-arg]
    """The region-keyed topics of one pipeline, all with the same partition count."""
    retention = {"retention.ms": str(retention_ms)}
    declared: list[Topic] = [  # type: ignore[type-arg]
        Topic(REGIONS, common_pb2.Region, partitions=partitions, config=retention),
        Topic(DESCRIPTIONS, describer_pb2.DescriptionRecord, partitions=partitions, config=retention),
        Topic(
            SCORES_LOCALIZATION, scoring_pb2.LocalizationScoreRecord, partitions=partitions, config=retention
        ),
        Topic(SCORES_SEMANTIC, scoring_pb2.SemanticScoreRecord, partitions=partitions, config=retention),
        Topic(PAIRS, pairs_pb2.PairDecision, partitions=partitions, config=retention),
    ]
    return {t.name: t for t in declared}


def dead_letter_topic(source: str, partitions: int = 1) -> Topic[common_pb2.ErrorInfo]:
    """Where records of `source` that cannot be processed go, with the error in headers and value."""
    return Topic(source + DEAD_LETTER_SUFFIX, common_pb2.ErrorInfo, partitions=partitions)
