"""``spr-replay``: re-run scoring and pairing over a range of ``descriptions`` (or ``regions``) as a new run.

Design (issue 5, "Replay"): replay COPIES the selected records of the source topic into a
run-scoped topic, ``<source>.<run_id>`` by default, stamped with the new run id; the replay's own
stages (scorers with the new versions, the pair builder with ``run_id``) then consume that topic
set exactly like the live pipeline consumes its own. So:

* lineage keeps the runs apart: a copied ``DescriptionRecord`` gets ``lineage.run_id = run_id`` and
  its scorer ids cleared (the new scorers stamp theirs); every copy carries headers ``spr-run-id``
  and ``spr-replay-source`` (``partition:offset`` of the original);
* pair ids derive from region id + run id (:func:`services.core.pairs.pair_id`), so the replay's
  pairs never collide with the original run's;
* the live stages never see the copies and the live run is untouched; a replay of ``regions`` goes
  through a describer stage with ``SPR_DESCRIBER_RUN_ID=<run_id>`` (a Region has no lineage);
* it is resumable and copies each record once: keys (region ids) are kept and the target has the
  source's partition count, so the newest copy in the target names the last source offset copied.

The range is per partition: ``from_offset <= offset < to_offset`` and/or by record timestamps
(``from_time_ms``/``to_time_ms``, resolved with the broker's time index); the end is fixed when the
replay starts, so a replay of a live topic terminates.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf.message import Message
from kafka import KafkaConsumer, TopicPartition
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.kafka_io import (
    SCHEMA_HEADER,
    Headers,
    KafkaSettings,
    ProtoProducer,
    Topic,
    UndecodableRecord,
    decode_record,
    ensure_topics,
)
from services.common.settings import SprSettings, load_settings
from services.common.topics import DESCRIPTIONS, REGIONS
from services.sampler import tail
from spr.v1 import common_pb2, describer_pb2

_LOG = logging.getLogger(__name__)

HEADER_RUN = "spr-run-id"
HEADER_SOURCE = "spr-replay-source"

#: Topics a replay can start from, with the message type of their values.
SOURCES: dict[str, type[Message]] = {
    DESCRIPTIONS: describer_pb2.DescriptionRecord,
    REGIONS: common_pb2.Region,
}


class ReplaySettings(SprSettings):
    """What to replay and where to: env prefix ``SPR_REPLAY_`` or ``--field-name VALUE`` flags."""

    model_config = SettingsConfigDict(env_prefix="SPR_REPLAY_")

    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap servers.")
    api_version: str | None = Field(
        default=None, description="Pin the Kafka protocol version, e.g. '2.0.0'; unset = negotiate."
    )
    run_id: str = Field(min_length=1, description="The new run id the copies belong to.")
    source_topic: str = Field(
        default=DESCRIPTIONS, description="descriptions or regions (or a topic of theirs)."
    )
    source_kind: str = Field(
        default="", description="Record type of the source: descriptions or regions; '' = by the topic name."
    )
    target_topic: str = Field(default="", description="Where the copies go; '' = <source_topic>.<run_id>.")
    from_offset: int | None = Field(default=None, ge=0, description="First offset copied, per partition.")
    to_offset: int | None = Field(default=None, ge=0, description="First offset NOT copied, per partition.")
    from_time_ms: int | None = Field(default=None, ge=0, description="First record timestamp copied (ms).")
    to_time_ms: int | None = Field(default=None, ge=0, description="First record timestamp NOT copied (ms).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")

    @model_validator(mode="after")
    def _check(self) -> ReplaySettings:
        self.kind()  # an unknown source fails at start
        return self

    def kind(self) -> str:
        """``descriptions`` or ``regions``."""
        kind = self.source_kind or self.source_topic
        if kind not in SOURCES:
            raise ValueError(f"cannot tell the record type of {self.source_topic!r}: set source_kind")
        return kind

    def selects_time(self, timestamp_ms: int) -> bool:
        """Whether a record's timestamp is in the time range (the time index only finds the start:
        its answer has record-batch granularity on some brokers, e.g. Tansu 0.6)."""
        if self.from_time_ms is not None and timestamp_ms < self.from_time_ms:
            return False
        return self.to_time_ms is None or timestamp_ms < self.to_time_ms

    def target(self) -> str:
        """The run-scoped topic the copies go to."""
        return self.target_topic or f"{self.source_topic}.{self.run_id}"

    def kafka(self) -> KafkaSettings:
        """The shared Kafka client settings."""
        version = tuple(int(p) for p in self.api_version.split(".")) if self.api_version else None
        return KafkaSettings(
            bootstrap_servers=self.bootstrap_servers, client_id="spr-replay", api_version=version
        )


@dataclass(frozen=True)
class Report:
    """What a replay did, per source partition."""

    run_id: str
    target_topic: str
    copied: dict[int, int]
    skipped_undecodable: int

    def stage_env(self, source_kind: str) -> dict[str, str]:
        """Settings that point the replay's own stages at the run-scoped topics."""
        run, target = self.run_id, self.target_topic
        if source_kind == REGIONS:
            env = {
                "SPR_DESCRIBER_RUN_ID": run,
                "SPR_DESCRIBER_STAGE__REGIONS_TOPIC": target,
                "SPR_DESCRIBER_STAGE__DESCRIPTIONS_TOPIC": f"{DESCRIPTIONS}.{run}",
                "SPR_DESCRIBER_STAGE__GROUP_ID": f"spr-describer.{run}",
            }
            target = f"{DESCRIPTIONS}.{run}"
        else:
            env = {}
        for scorer in ("LOCALIZATION", "SEMANTIC"):
            env[f"SPR_{scorer}_STAGE__DESCRIPTIONS_TOPIC"] = target
            env[f"SPR_{scorer}_STAGE__SCORES_TOPIC"] = f"scores.{scorer.lower()}.{run}"
            env[f"SPR_{scorer}_STAGE__GROUP_ID"] = f"spr-{scorer.lower()}.{run}"
        env.update(
            SPR_PAIRS_RUN_ID=run,
            SPR_PAIRS_DESCRIPTIONS_TOPIC=target,
            SPR_PAIRS_LOCALIZATION_TOPIC=f"scores.localization.{run}",
            SPR_PAIRS_SEMANTIC_TOPIC=f"scores.semantic.{run}",
            SPR_PAIRS_GROUP_ID=f"spr-pair-builder.{run}",
        )
        return env


def stamped(message: Message, run_id: str) -> Message:
    """The copy of ``message`` that belongs to ``run_id`` (scorer ids cleared for the new scorers)."""
    copy = type(message)()
    copy.CopyFrom(message)
    if isinstance(copy, describer_pb2.DescriptionRecord):
        copy.lineage.run_id = run_id
        copy.lineage.localization_scorer_id = ""
        copy.lineage.semantic_scorer_id = ""
    return copy


def copied_up_to(consumer: KafkaConsumer, target: str, run_id: str) -> dict[int, int]:
    """``{source partition: last source offset copied}`` from the newest copies in ``target``."""
    done: dict[int, int] = {}
    for partition in tail.partitions_of(consumer, target):
        for record in tail.newest_first(consumer, partition):
            source = tail.header(record, HEADER_SOURCE)
            if tail.header(record, HEADER_RUN) != run_id or source is None:
                continue
            number, offset = (int(part) for part in source.split(":"))
            done[number] = max(done.get(number, -1), offset)
            break
    return done


def offset_range(
    consumer: KafkaConsumer, partition: TopicPartition, settings: ReplaySettings
) -> tuple[int, int]:
    """``[start, stop)`` of ``partition`` selected by the offsets and timestamps of ``settings``."""
    start = consumer.beginning_offsets([partition])[partition]
    stop = tail.end_offset(consumer, partition)
    if settings.from_offset is not None:
        start = max(start, settings.from_offset)
    if settings.to_offset is not None:
        stop = min(stop, settings.to_offset)
    if settings.from_time_ms is not None:
        found = consumer.offsets_for_times({partition: settings.from_time_ms})[partition]
        start = max(start, found.offset if found is not None else stop)
    if settings.to_time_ms is not None:
        found = consumer.offsets_for_times({partition: settings.to_time_ms})[partition]
        stop = min(stop, found.offset if found is not None else stop)
    return start, stop


def replay(settings: ReplaySettings) -> Report:
    """Copy the selected range into the run-scoped topic (resuming a previous attempt)."""
    kafka = settings.kafka()
    message_type = SOURCES[settings.kind()]
    consumer = tail.reader(kafka)
    try:
        sources = tail.partitions_of(consumer, settings.source_topic)
        if not sources:
            raise ValueError(f"source topic {settings.source_topic!r} does not exist")
        target: Topic[Any] = Topic(settings.target(), message_type, partitions=len(sources))
        ensure_topics(kafka, [target])  # same partition count: a key lands on the same partition number
        done = copied_up_to(consumer, target.name, settings.run_id)
        with ProtoProducer(kafka) as producer:
            copied, skipped = {}, 0
            for partition in sources:
                start, stop = offset_range(consumer, partition, settings)
                start = max(start, done.get(partition.partition, -1) + 1)
                count, bad = _copy(consumer, producer, partition, (start, stop), target, settings)
                copied[partition.partition], skipped = count, skipped + bad
            producer.flush()
    finally:
        consumer.close()
    return Report(settings.run_id, target.name, copied, skipped)


def _copy(
    consumer: KafkaConsumer,
    producer: ProtoProducer,
    partition: TopicPartition,
    bounds: tuple[int, int],
    target: Topic[Any],
    settings: ReplaySettings,
) -> tuple[int, int]:
    """Copy ``partition``'s records in ``bounds``, chunk by chunk; ``(copied, undecodable)``."""
    source: Topic[Any] = Topic(partition.topic, target.message_type)
    run_id = settings.run_id
    copied = skipped = 0
    start, stop = bounds
    while start < stop:
        chunk_stop = min(stop, start + tail.CHUNK_RECORDS)
        for raw in tail.read_range(consumer, partition, start, chunk_stop):
            if not settings.selects_time(raw.timestamp):
                continue
            record = decode_record(source, raw)
            if isinstance(record, UndecodableRecord):  # the live stage dead-lettered it already
                _LOG.warning("skipping undecodable %s@%d: %s", partition, record.offset, record.reason)
                skipped += 1
                continue
            kept = [(k, v) for k, v in record.headers if k not in (SCHEMA_HEADER, HEADER_RUN, HEADER_SOURCE)]
            headers: Headers = [
                *kept,
                (HEADER_RUN, run_id.encode()),
                (HEADER_SOURCE, f"{partition.partition}:{record.offset}".encode()),
            ]
            producer.send(target, record.key, stamped(record.message, run_id), extra_headers=headers)
            copied += 1
        start = chunk_stop
    return copied, skipped


def main(argv: Sequence[str] | None = None) -> None:
    """``spr-replay --run-id R [--source-topic descriptions] [--from-offset N] ...``; prints a JSON report."""
    parser = argparse.ArgumentParser(description="Copy a topic range into a run-scoped topic as a new run.")
    for name, info in ReplaySettings.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=info.description)
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    settings = load_settings(ReplaySettings, rest, **overrides)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = replay(settings)
    print(
        json.dumps(
            {
                "run_id": report.run_id,
                "target_topic": report.target_topic,
                "copied": report.copied,
                "skipped_undecodable": report.skipped_undecodable,
                "stage_env": report.stage_env(settings.kind()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
