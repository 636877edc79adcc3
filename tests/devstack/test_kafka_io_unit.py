"""kafka_io without a broker: schema ids, header checks, decoding, commit offsets, client kwargs."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
from kafka import TopicPartition

from services.common.kafka_io import (
    SCHEMA_HEADER,
    ConsumedRecord,
    KafkaSettings,
    SchemaError,
    Topic,
    UndecodableRecord,
    _next_offsets,
    decode_record,
    parse_schema_id,
    schema_id,
)
from spr.v1 import common_pb2, pairs_pb2

PAIRS = Topic("pairs", pairs_pb2.PairDecision, partitions=3)


class RawRecord(NamedTuple):
    """The fields of a kafka-python ConsumerRecord that decode_record reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int = 1_700_000_000_000


def raw(value: bytes, headers: list[tuple[str, bytes]], key: bytes | None = b"r-1") -> RawRecord:
    return RawRecord("pairs", 2, 17, key, value, headers)


def test_schema_id_names_the_full_protobuf_type_and_version() -> None:
    assert schema_id(pairs_pb2.PairDecision, 1) == "spr.v1.PairDecision/1"
    assert PAIRS.schema == "spr.v1.PairDecision/1"
    assert parse_schema_id(b"spr.v1.PairDecision/12") == ("spr.v1.PairDecision", 12)


@pytest.mark.parametrize("bad", [b"spr.v1.PairDecision", b"/1", b"spr.v1.X/one", b"\xff/1"])
def test_malformed_schema_ids_are_rejected(bad: bytes) -> None:
    with pytest.raises(SchemaError):
        parse_schema_id(bad)


def test_decode_record_returns_the_typed_message() -> None:
    msg = pairs_pb2.PairDecision(region_id="r-1", detail="ok")
    record = decode_record(PAIRS, raw(msg.SerializeToString(), [(SCHEMA_HEADER, b"spr.v1.PairDecision/1")]))
    assert isinstance(record, ConsumedRecord)
    assert (record.key, record.message, record.schema_version) == ("r-1", msg, 1)
    assert (record.topic, record.partition, record.offset) == ("pairs", 2, 17)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([], "expected one spr-schema header, found 0"),
        ([(SCHEMA_HEADER, b"spr.v1.Region/1")], "expects spr.v1.PairDecision"),
        ([(SCHEMA_HEADER, b"spr.v1.PairDecision/2")], "version 2 is not accepted"),
        ([(SCHEMA_HEADER, b"spr.v1.PairDecision/1")] * 2, "found 2"),
    ],
)
def test_header_mismatches_become_undecodable_records(headers: list[tuple[str, bytes]], reason: str) -> None:
    value = pairs_pb2.PairDecision(region_id="r-1").SerializeToString()
    record = decode_record(PAIRS, raw(value, headers))
    assert isinstance(record, UndecodableRecord)
    assert reason in record.reason
    assert record.value == value  # kept verbatim for the dead-letter topic


def test_garbage_value_becomes_undecodable_record() -> None:
    record = decode_record(PAIRS, raw(b"\xff\xff\xff", [(SCHEMA_HEADER, b"spr.v1.PairDecision/1")]))
    assert isinstance(record, UndecodableRecord)
    assert "DecodeError" in record.reason


def test_accepted_versions_allow_rolling_upgrades() -> None:
    topic = Topic("pairs", pairs_pb2.PairDecision, schema_version=2, accepted_versions=frozenset({1, 2}))
    value = pairs_pb2.PairDecision(region_id="r").SerializeToString()
    record = decode_record(topic, raw(value, [(SCHEMA_HEADER, b"spr.v1.PairDecision/1")]))
    assert isinstance(record, ConsumedRecord)
    assert record.schema_version == 1


def test_next_offsets_commit_one_past_the_highest_record_per_partition() -> None:
    def rec(partition: int, offset: int) -> ConsumedRecord[Any]:
        return ConsumedRecord("t", partition, offset, "k", common_pb2.Region(), 1, 0, ())

    offsets = _next_offsets([rec(0, 4), rec(0, 9), rec(1, 0), rec(0, 7)])
    assert {tp: meta.offset for tp, meta in offsets.items()} == {
        TopicPartition("t", 0): 10,
        TopicPartition("t", 1): 1,
    }


def test_settings_kwargs_are_production_safe_and_split_by_client() -> None:
    settings = KafkaSettings(bootstrap_servers="a:9092,b:9092")
    producer = settings.producer_kwargs()
    assert producer["acks"] == "all" and producer["enable_idempotence"] is True
    assert producer["bootstrap_servers"] == ["a:9092", "b:9092"]
    assert "api_version" not in producer  # negotiated unless a broker needs pinning
    consumer = settings.consumer_kwargs("g")
    assert consumer["enable_auto_commit"] is False and consumer["group_id"] == "g"
    assert "session_timeout_ms" not in settings.admin_kwargs()  # admin/producer reject consumer keys
