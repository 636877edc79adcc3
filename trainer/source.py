"""Reading `pairs` from the trainer's committed offsets, the offset ranges a round consumed, and the
on-demand requests on `trainer.control`.

Offsets are committed by `trainer.rounds.run_round` only, after the adapter is published: a crash
anywhere before that redelivers the same records to the next run (at-least-once). Duplicates are
dropped by pair id twice over: within a batch (`Batch.pairs`), and against every pair a published
version was already trained on (`fresh_pairs`, from the adapter store).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kafka import TopicPartition

from services.common.kafka_io import ConsumedRecord, ProtoConsumer, UndecodableRecord, ensure_topics
from services.common.topics import PAIRS, stream_topics, trainer_control_topic
from spr.v1 import adapters_pb2, pairs_pb2
from trainer.config import TrainerConfig

log = logging.getLogger(__name__)

Polled = ConsumedRecord[pairs_pb2.PairDecision] | UndecodableRecord
ControlPolled = ConsumedRecord[adapters_pb2.TrainingTrigger] | UndecodableRecord


@dataclass
class Batch:
    """Records consumed since the last commit."""

    records: list[Polled] = field(default_factory=list)
    started_monotonic: float = field(default_factory=time.monotonic)

    def add(self, polled: list[Polled]) -> None:
        """Append newly polled records."""
        self.records.extend(polled)

    def pairs(self) -> list[pairs_pb2.PreferencePair]:
        """Unique pairs (by pair id, first seen wins); skips and undecodable records carry none."""
        seen: dict[str, pairs_pb2.PreferencePair] = {}
        for record in self.records:
            if isinstance(record, ConsumedRecord) and record.message.WhichOneof("decision") == "pair":
                seen.setdefault(record.message.pair.pair_id, record.message.pair)
        return list(seen.values())

    def fresh_pairs(self, trained: set[str]) -> list[pairs_pb2.PreferencePair]:
        """Unique pairs no published version was trained on yet."""
        return [pair for pair in self.pairs() if pair.pair_id not in trained]

    def ranges(self) -> list[adapters_pb2.PairRange]:
        """Per partition: [first offset, last offset + 1) of what this batch consumed."""
        bounds: dict[tuple[str, int], tuple[int, int]] = {}
        for r in self.records:
            low, high = bounds.get((r.topic, r.partition), (r.offset, r.offset))
            bounds[(r.topic, r.partition)] = (min(low, r.offset), max(high, r.offset))
        return [
            adapters_pb2.PairRange(topic=t, partition=p, start_offset=low, end_offset=high + 1)
            for (t, p), (low, high) in sorted(bounds.items())
        ]


def open_consumer(cfg: TrainerConfig) -> ProtoConsumer[pairs_pb2.PairDecision]:
    """A member of the trainer's group on `pairs`, positioned at the committed offsets."""
    topic = stream_topics()[PAIRS]
    return ProtoConsumer(cfg.kafka(), cfg.group_id, [topic])


def open_control_consumer(cfg: TrainerConfig) -> ProtoConsumer[adapters_pb2.TrainingTrigger]:
    """A member of the trainer's control group on `trainer.control` (its own group: its commits are not
    the pairs' commits). The topic is created first: a consumer only notices a topic created after it
    subscribed at its next metadata refresh, minutes later."""
    topic = trainer_control_topic()
    ensure_topics(cfg.kafka(), [topic])
    return ProtoConsumer(cfg.kafka(), f"{cfg.group_id}.control", [topic])


def on_demand(polled: list[ControlPolled]) -> list[adapters_pb2.TrainingTrigger]:
    """The well-formed on-demand requests among polled control records; the others are logged and skipped."""
    requests = []
    for record in polled:
        if isinstance(record, UndecodableRecord):
            log.error("ignoring control record %s:%s: %s", record.partition, record.offset, record.reason)
        elif record.message.kind != adapters_pb2.TRIGGER_KIND_ON_DEMAND or not record.message.trigger_id:
            log.error("ignoring control record %s:%s: no on-demand trigger", record.partition, record.offset)
        else:
            requests.append(record.message)
    return requests


def drain(consumer: ProtoConsumer[pairs_pb2.PairDecision], cfg: TrainerConfig, batch: Batch) -> Batch:
    """Poll until the trainer has read everything its partitions held when they were assigned (one-shot
    and export: what the topic holds when the command runs), the topic has been idle for `poll_idle_s`
    (records the end offsets count but no fetch returns: aborted or compacted ones), or the batch
    holds `max_pairs` records."""
    idle_since = time.monotonic()
    ends: dict[TopicPartition, int] = {}
    while len(batch.records) < cfg.max_pairs:
        polled = consumer.poll(timeout_ms=500, max_records=cfg.max_pairs - len(batch.records))
        assignment = consumer.raw.assignment()
        if polled or not assignment:
            # Idle time only counts once partitions are assigned: joining the group (or waiting for a
            # dead member's session to expire) is not an empty topic.
            batch.add(polled)
            idle_since = time.monotonic()
        if assignment and set(ends) != assignment:  # first assigned, or a rebalance moved them
            ends = consumer.raw.end_offsets(list(assignment))
        if ends and all(consumer.raw.position(tp) >= end for tp, end in ends.items()):
            break
        if time.monotonic() - idle_since >= cfg.poll_idle_s:
            break
    log.info("consumed %d records, %d unique pairs", len(batch.records), len(batch.pairs()))
    return batch
