"""Stream helpers of the pair builder tests and bench: topics with unique names, producing a region's
records, reading every record of a topic, and the builder's settings as environment variables."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from services.common.kafka_io import ConsumedRecord, KafkaSettings, ProtoProducer, Topic, decode_record
from services.common.topics import DESCRIPTIONS, PAIRS, SCORES_LOCALIZATION, SCORES_SEMANTIC, stream_topics
from services.pairs.settings import PairBuilderSettings
from spr.v1 import common_pb2, pairs_pb2
from tests.pairs import records

PARTITIONS = 3


@dataclass(frozen=True)
class StreamTopics:
    """One test's private copies of the builder's topics."""

    descriptions: Topic[Any]
    localization: Topic[Any]
    semantic: Topic[Any]
    pairs: Topic[pairs_pb2.PairDecision]
    dead_letters: Topic[common_pb2.ErrorInfo]

    @classmethod
    def unique(cls, prefix: str = "t") -> StreamTopics:
        tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
        declared = stream_topics(PARTITIONS)

        def named(key: str) -> Topic[Any]:
            return replace(declared[key], name=f"{tag}.{key}")

        return cls(
            named(DESCRIPTIONS),
            named(SCORES_LOCALIZATION),
            named(SCORES_SEMANTIC),
            named(PAIRS),
            Topic(f"{tag}.pairs.dlq", common_pb2.ErrorInfo, partitions=1),
        )

    def settings(self, kafka: KafkaSettings, **overrides: Any) -> PairBuilderSettings:
        """Builder settings on these topics (group and run id unique unless given)."""
        fields: dict[str, Any] = {
            "bootstrap_servers": kafka.bootstrap_servers,
            "api_version": ".".join(map(str, kafka.api_version)) if kafka.api_version else None,
            "session_timeout_ms": kafka.session_timeout_ms,
            "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
            "group_id": f"{self.pairs.name}-builder",
            "descriptions_topic": self.descriptions.name,
            "localization_topic": self.localization.name,
            "semantic_topic": self.semantic.name,
            "pairs_topic": self.pairs.name,
            "dead_letter_topic": self.dead_letters.name,
            "partitions": PARTITIONS,
            "metrics_enabled": False,
            **overrides,
        }
        return PairBuilderSettings(**fields)


def settings_env(settings: PairBuilderSettings) -> dict[str, str]:
    """The same settings as SPR_PAIRS_* environment variables (for a builder subprocess)."""
    env = {}
    for name, value in settings.model_dump(exclude_none=True).items():
        env[PairBuilderSettings.env_var(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def region_messages(region_id: str, run_id: str = "") -> tuple[Any, Any, Any]:
    """The description and both score records of one region."""
    record = records.description(region_id, run_id=run_id)
    return record, records.localization(record), records.semantic(record)


def produce_region(producer: ProtoProducer, topics: StreamTopics, region_id: str, run_id: str = "") -> None:
    """All three records of a region."""
    record, loc, sem = region_messages(region_id, run_id)
    producer.send(topics.descriptions, region_id, record)
    producer.send(topics.localization, region_id, loc)
    producer.send(topics.semantic, region_id, sem)


def read_raw(
    kafka: KafkaSettings,
    name: str,
    partitions: int,
    done: Callable[[list[Any]], bool],
    timeout_s: float = 60.0,
) -> list[Any]:
    """Every raw record of a topic from the beginning, until ``done(records)`` or the timeout."""
    consumer = KafkaConsumer(**kafka.common_kwargs(), enable_auto_commit=False)
    try:
        assigned = [TopicPartition(name, p) for p in range(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        found: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while not done(found) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                found.extend(batch)
        return found
    finally:
        consumer.close()


def read_topic(
    kafka: KafkaSettings,
    topic: Topic[Any],
    done: Callable[[list[Any]], bool],
    timeout_s: float = 60.0,
) -> list[ConsumedRecord[Any]]:
    """Every record of ``topic``, decoded (all must decode), until ``done(records)`` or the timeout."""
    raw = read_raw(kafka, topic.name, topic.partitions, done, timeout_s)
    decoded = [decode_record(topic, r) for r in raw]
    assert all(isinstance(d, ConsumedRecord) for d in decoded), decoded
    return decoded  # type: ignore[return-value]
