"""spr.v1 protobuf records through a REAL broker (noida and Tansu) with a consumer group."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from kafka import KafkaProducer, TopicPartition

from services.common.kafka_io import (
    SCHEMA_HEADER,
    ConsumedRecord,
    KafkaSettings,
    ProtoConsumer,
    ProtoProducer,
    Topic,
    TopicMismatchError,
    UndecodableRecord,
    ensure_topics,
)
from services.devstack.broker import BrokerProcess
from spr.v1 import common_pb2, pairs_pb2

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    """Topic/group names of their own, so tests sharing a session broker never interfere."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def decision(i: int) -> pairs_pb2.PairDecision:
    return pairs_pb2.PairDecision(region_id=f"region-{i:03d}", detail=f"decision {i}")


def poll_until(consumer: ProtoConsumer[Any], count: int, timeout: float = 60.0) -> list[Any]:
    """Poll exactly up to ``count`` records (max_records caps each poll, so none is over-consumed)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got.extend(consumer.poll(timeout_ms=500, max_records=count - len(got)))
    return got


def poll_for(consumer: ProtoConsumer[Any], seconds: float) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got.extend(consumer.poll(timeout_ms=300))
    return got


def committed(settings: KafkaSettings, group: str, topic: Topic[Any]) -> dict[int, int]:
    consumer = ProtoConsumer(settings, group, [topic])
    try:
        tps = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        return {tp.partition: consumer.raw.committed(tp) or 0 for tp in tps}
    finally:
        consumer.close()


def test_consumer_group_resumes_exactly_at_committed_offsets(any_broker: BrokerProcess) -> None:
    settings = any_broker.settings()
    topic = Topic(unique("pairs"), pairs_pb2.PairDecision, partitions=3)
    group = unique("pair-sink")
    ensure_topics(settings, [topic])
    sent = [decision(i) for i in range(50)]
    with ProtoProducer(settings) as producer:
        for message in sent:
            producer.send(topic, message.region_id, message)
        producer.flush(timeout=30)

    with ProtoConsumer(settings, group, [topic]) as first:
        batch1 = poll_until(first, 20)
        assert len(batch1) == 20
        assert first.commit()
    assert sum(committed(settings, group, topic).values()) == 20

    with ProtoConsumer(settings, group, [topic]) as second:
        batch2 = poll_until(second, 30)
        extra = poll_for(second, 1.0)
        assert second.commit(batch2)

    assert extra == []
    records = batch1 + batch2
    assert all(isinstance(r, ConsumedRecord) for r in records)
    assert sorted(r.message.region_id for r in records) == [m.region_id for m in sent]  # each once
    by_id = {m.region_id: m for m in sent}
    for record in records:
        assert record.message == by_id[record.key]  # keyed by region id, value intact
        assert dict(record.headers)[SCHEMA_HEADER] == b"spr.v1.PairDecision/1"
        assert record.schema_version == 1
    assert sum(committed(settings, group, topic).values()) == 50


def test_same_key_lands_on_the_same_partition_number_across_topics(any_broker: BrokerProcess) -> None:
    # Several fresh producers, each writing alternately to two topics that exist before it starts:
    # the pattern that made kafka-python drop an untracked topic's metadata (see ProtoProducer._track).
    settings = any_broker.settings()
    for _ in range(3):
        regions = Topic(unique("regions"), common_pb2.Region, partitions=4)
        pairs = Topic(unique("pairs"), pairs_pb2.PairDecision, partitions=4)
        ensure_topics(settings, [regions, pairs])
        with ProtoProducer(settings) as producer:
            for i in range(12):
                region_id = f"region-{i}"
                a = producer.send_and_wait(regions, region_id, common_pb2.Region(region_id=region_id), 10)
                b = producer.send_and_wait(pairs, region_id, pairs_pb2.PairDecision(region_id=region_id), 10)
                assert a.partition == b.partition


def test_records_with_a_wrong_header_come_back_undecodable(any_broker: BrokerProcess) -> None:
    settings = any_broker.settings()
    topic = Topic(unique("regions"), common_pb2.Region, partitions=1)
    ensure_topics(settings, [topic])
    raw = KafkaProducer(**settings.producer_kwargs())
    try:
        value = common_pb2.Region(region_id="r").SerializeToString()
        raw.send(topic.name, key=b"r", value=value, headers=[(SCHEMA_HEADER, b"spr.v1.PairDecision/1")])
        raw.send(topic.name, key=b"r", value=value)  # no header at all
        raw.flush(timeout=30)
    finally:
        raw.close()
    with ProtoProducer(settings) as producer:
        producer.send_and_wait(topic, "r", common_pb2.Region(region_id="r"))
    with ProtoConsumer(settings, unique("g"), [topic]) as consumer:
        records = poll_until(consumer, 3)
    assert [type(r) for r in records] == [UndecodableRecord, UndecodableRecord, ConsumedRecord]
    assert "expects spr.v1.Region" in records[0].reason
    assert records[1].value == value


def test_ensure_topics_is_idempotent_and_detects_mismatches(any_broker: BrokerProcess) -> None:
    settings = any_broker.settings()
    name = unique("adapters")
    topic = Topic(name, common_pb2.Region, partitions=2, config={"cleanup.policy": "compact"})
    ensure_topics(settings, [topic])
    ensure_topics(settings, [topic])  # already there: fine
    with pytest.raises(TopicMismatchError, match="partitions"):
        ensure_topics(settings, [Topic(name, common_pb2.Region, partitions=3)])


def test_ensure_topics_checks_reported_configs(kafka_broker: BrokerProcess) -> None:
    # noida reports topic configs (Tansu reports none, so there the check cannot fire).
    settings = kafka_broker.settings()
    name = unique("adapters")
    ensure_topics(settings, [Topic(name, common_pb2.Region, config={"cleanup.policy": "compact"})])
    with pytest.raises(TopicMismatchError, match=r"cleanup\.policy"):
        ensure_topics(settings, [Topic(name, common_pb2.Region, config={"cleanup.policy": "delete"})])


def test_producer_refuses_a_message_of_another_type(kafka_broker: BrokerProcess) -> None:
    topic = Topic(unique("pairs"), pairs_pb2.PairDecision)
    with ProtoProducer(kafka_broker.settings()) as producer, pytest.raises(ValueError, match="carries"):
        producer.send(topic, "r", common_pb2.Region(region_id="r"))  # type: ignore[misc]  # mypy rejects it too
