"""Pipeline stats from Kafka's offsets: lag and dead letters per stage, throughput between calls."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from services.admin.pipeline import RateMeter, TopicOffsets, stage_lag
from services.admin.settings import StageSpec
from services.common.kafka_io import Topic, ensure_topics
from services.devstack.broker import BrokerProcess
from spr.v1 import adapters_pb2, common_pb2
from tests.admin.conftest import AdminHarness


def _tp(partition: int, topic: str = "regions") -> TopicPartition:
    return TopicPartition(topic, partition)


def test_lag_counts_uncommitted_partitions_from_their_earliest_offset() -> None:
    offsets = TopicOffsets(
        earliest={_tp(0): 0, _tp(1): 5, _tp(2): 0},
        latest={_tp(0): 10, _tp(1): 8, _tp(2): 4, _tp(0, "other"): 100},
    )
    # p0: 10-7; p1: committed 2 was deleted by retention, so 8-5; p2: never committed, 4-0.
    assert stage_lag(offsets, {_tp(0): 7, _tp(1): 2}, ["regions"]) == (3 + 3 + 4, 9)
    assert stage_lag(offsets, {_tp(0): 12}, ["regions"])[0] == 0 + 3 + 4  # never negative
    assert stage_lag(offsets, {}, ["missing"]) == (0, 0)


def test_rate_is_the_growth_of_committed_offsets_over_the_window() -> None:
    meter = RateMeter(window_s=60.0)
    assert meter.update(100.0, 0) == 0.0  # first call: nothing to compare with
    assert meter.update(110.0, 50) == pytest.approx(5.0)
    assert meter.update(170.0, 170) == pytest.approx(120 / 60)  # base: the newest at the window start
    assert meter.update(175.0, 180) == pytest.approx((180 - 50) / 65)  # 100.0 left the window
    assert meter.update(500.0, 510) == pytest.approx((510 - 180) / 325)  # calls further apart
    assert meter.update(510.0, 0) == 0.0  # a group reset is not negative throughput


def _produce(broker: BrokerProcess, topic: str, count: int) -> None:
    producer = KafkaProducer(**broker.settings().common_kwargs())
    for i in range(count):
        producer.send(topic, key=f"region-{i}".encode(), value=b"x")
        # One record per batch: Tansu reports a partition's end offset as its batch count.
        producer.flush()
    producer.close()


def _commit(broker: BrokerProcess, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit offsets for a group without joining it (what a stage does after processing)."""
    consumer = KafkaConsumer(**broker.settings().consumer_kwargs(group))
    consumer.assign(list(offsets))
    consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})
    consumer.close(autocommit=False)


@pytest.mark.integration
def test_pipeline_stats_report_lag_throughput_and_dead_letters(
    admin_factory: Callable[..., AdminHarness], broker: BrokerProcess
) -> None:
    stages = (
        StageSpec(stage="describer", group_id="spr-describer", topics=("regions",)),
        StageSpec(stage="trainer", group_id="spr-trainer", topics=("pairs",)),  # topics not created yet
    )
    admin = admin_factory(stages=stages)
    ensure_topics(
        broker.settings(),
        [Topic("regions", common_pb2.Region, partitions=3), Topic("regions.dlq", common_pb2.ErrorInfo)],
    )
    _produce(broker, "regions", 12)
    _produce(broker, "regions.dlq", 2)
    ends = admin.core.stats._offsets(admin.core.stats._connect(), {"regions"}).latest
    assert sum(ends.values()) == 12

    first_tp = sorted(ends, key=lambda tp: tp.partition)[0]
    _commit(broker, "spr-describer", {first_tp: ends[first_tp]})
    stats = admin.stub.GetPipelineStats(adapters_pb2.PipelineStatsRequest(), timeout=30)
    by_stage = {s.stage: s for s in stats.stages}
    assert (by_stage["describer"].consumer_lag, by_stage["describer"].dead_letters) == (
        12 - ends[first_tp],
        2,
    )
    assert (by_stage["trainer"].consumer_lag, by_stage["trainer"].dead_letters) == (0, 0)
    assert by_stage["describer"].records_per_second == 0.0  # first measurement
    assert stats.pairs_built == 0 and not stats.pairs_skipped  # not measured (see services.admin.pipeline)

    _commit(broker, "spr-describer", dict(ends))
    stats = admin.stub.GetPipelineStats(adapters_pb2.PipelineStatsRequest(), timeout=30)
    describer = next(s for s in stats.stages if s.stage == "describer")
    assert describer.consumer_lag == 0 and describer.records_per_second > 0
