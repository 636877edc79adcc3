"""The pair builder on a real broker (noida and Tansu): one decision per region, bad input dead-lettered."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from kafka.partitioner.default import murmur2
from prometheus_client import REGISTRY

from services.common.kafka_io import SCHEMA_HEADER, KafkaSettings, ProtoProducer, ensure_topics
from services.core import pair_id
from services.devstack.broker import BrokerProcess
from services.pairs.builder import (
    CODE_INTERNAL,
    CODE_INVALID,
    CODE_MISMATCH,
    CODE_TIMED_OUT,
    CODE_UNDECODABLE,
    PairBuilder,
)
from services.pairs.logic import decide, decide_all
from services.pairs.settings import PairBuilderSettings
from spr.v1 import common_pb2, describer_pb2, pairs_pb2, scoring_pb2
from tests.pairs.stream import StreamTopics, read_raw, read_topic, region_messages

pytestmark = pytest.mark.integration

RUN = "run-it"
METRICS = [
    ("spr_pairs_dead_letters_total", {"code": CODE_MISMATCH}),
    ("spr_pairs_decisions_total", {"outcome": "scores_timed_out"}),
    ("spr_pairs_decisions_total", {"outcome": "scoring_failed"}),
    ("spr_pairs_decisions_total", {"outcome": "describe_failed"}),
    ("spr_pairs_dropped_records_total", None),
    ("spr_pairs_margin_count", {}),
    ("spr_pairs_decide_batch_regions_sum", {}),
    ("spr_pairs_decide_batch_regions_count", {}),
]


def _sample(name: str, labels: dict[str, str] | None) -> float:
    """A metric's value in this process; labels None = summed over every label set."""
    if labels is not None:
        return REGISTRY.get_sample_value(name, labels) or 0.0
    return sum(s.value for m in REGISTRY.collect() for s in m.samples if s.name == name)


def _stream(kafka: KafkaSettings, prefix: str) -> tuple[StreamTopics, PairBuilderSettings]:
    """Fresh topics of the builder's stream, created, and builder settings on them."""
    topics = StreamTopics.unique(prefix)
    settings = topics.settings(kafka, run_id=RUN, timeout_s=3.0, commit_interval_s=0.2)
    ensure_topics(
        kafka, [topics.descriptions, topics.localization, topics.semantic, topics.pairs, topics.dead_letters]
    )
    return topics, settings


@contextmanager
def _running(builder: PairBuilder) -> Iterator[None]:
    """The builder's loop on a thread for the duration of the block, then stopped and closed."""
    stop = threading.Event()
    thread = threading.Thread(target=builder.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        builder.close()


def _produce_shuffled(kafka: KafkaSettings, topics: StreamTopics, region_ids: list[str]) -> None:
    """Every record of every region, in a random order across topics and regions."""
    sends: list[tuple[Any, str, Any]] = []
    for region_id in region_ids:
        record, loc, sem = region_messages(region_id)
        sends += [(topics.descriptions, region_id, record), (topics.localization, region_id, loc)]
        sends += [(topics.semantic, region_id, sem)]
    random.Random(7).shuffle(sends)
    with ProtoProducer(kafka) as producer:
        for topic, key, message in sends:
            producer.send(topic, key, message)


def _produce_bad_input(kafka: KafkaSettings, topics: StreamTopics) -> None:
    """An undecodable record, a region whose scores are of another run, a region never scored
    semantically, a region its localization scorer failed on, a region the describer failed on (its
    error passed on by both scorers), a region with a NaN score, and a duplicated score record."""
    with ProtoProducer(kafka) as producer:
        raw = producer._producer  # the typed producer cannot send a wrong schema header; that is the point
        raw.send(
            topics.localization.name, key=b"bad/0", value=b"\x00garbage", headers=[(SCHEMA_HEADER, b"x/1")]
        )
        record, loc, sem = region_messages("bad/mismatch")
        sem.lineage.run_id = "another-run"
        for topic, message in (
            (topics.descriptions, record),
            (topics.localization, loc),
            (topics.semantic, sem),
        ):
            producer.send(topic, "bad/mismatch", message)
        record, loc, _ = region_messages("bad/no-semantic")
        producer.send(topics.descriptions, "bad/no-semantic", record)
        producer.send(topics.localization, "bad/no-semantic", loc)
        producer.send(topics.localization, "good/3", region_messages("good/3")[1])  # a duplicate
        record, loc, sem = region_messages("bad/scoring-failed")
        failed = scoring_pb2.LocalizationScoreRecord(
            region_id=loc.region_id,
            lineage=loc.lineage,
            error=common_pb2.ErrorInfo(stage="localization_scorer", code="POLICY_FAILED", message="boom"),
        )
        for topic, message in (
            (topics.descriptions, record),
            (topics.localization, failed),
            (topics.semantic, sem),
        ):
            producer.send(topic, "bad/scoring-failed", message)
        record, loc, sem = region_messages("bad/nan-score")  # decided in one batch with good regions
        sem.scores[0].s_sem = float("nan")
        for topic, message in (
            (topics.descriptions, record),
            (topics.localization, loc),
            (topics.semantic, sem),
        ):
            producer.send(topic, "bad/nan-score", message)
        record, loc, sem = region_messages("bad/describe-failed")
        error = common_pb2.ErrorInfo(stage="describer", code="IMAGE_UNREADABLE", message="truncated PNG")
        described = describer_pb2.DescriptionRecord(region=record.region, lineage=record.lineage, error=error)
        for topic, message in (
            (topics.descriptions, described),
            (
                topics.localization,
                scoring_pb2.LocalizationScoreRecord(
                    region_id=loc.region_id, lineage=loc.lineage, error=error
                ),
            ),
            (
                topics.semantic,
                scoring_pb2.SemanticScoreRecord(region_id=sem.region_id, lineage=sem.lineage, error=error),
            ),
        ):
            producer.send(topic, "bad/describe-failed", message)


@pytest.mark.parametrize("broker_fixture", ["kafka_broker", "tansu_broker"])
def test_one_decision_per_region_with_deterministic_ids(
    broker_fixture: str, request: pytest.FixtureRequest
) -> None:
    broker: BrokerProcess = request.getfixturevalue(broker_fixture)
    kafka = broker.settings()
    topics, settings = _stream(kafka, "builder")
    good = [f"good/{i}" for i in range(40)]
    _produce_shuffled(kafka, topics, good)
    _produce_bad_input(kafka, topics)

    before = [_sample(name, labels) for name, labels in METRICS]
    with _running(PairBuilder(settings, kafka)):
        decisions = read_topic(kafka, topics.pairs, lambda found: len(found) >= len(good) + 3, timeout_s=90)
        dead = read_raw(kafka, topics.dead_letters.name, 1, lambda found: len(found) >= 9, timeout_s=30)

    by_region = Counter(d.message.region_id for d in decisions)
    assert set(by_region) == {*good, "bad/no-semantic", "bad/scoring-failed", "bad/describe-failed"}
    assert set(by_region.values()) == {1}
    for found in decisions:
        decision = found.message
        if found.key == "bad/no-semantic":
            assert decision.skip == pairs_pb2.SKIP_REASON_SCORES_TIMED_OUT
            continue
        if found.key == "bad/scoring-failed":  # decided at once from the scorer's error record
            assert decision.skip == pairs_pb2.SKIP_REASON_SCORING_FAILED
            assert decision.detail == "localization_scorer: POLICY_FAILED boom"
            continue
        if found.key == "bad/describe-failed":  # decided at once from the describer's error record
            assert decision.skip == pairs_pb2.SKIP_REASON_DESCRIBE_FAILED
            assert decision.detail == "describer: IMAGE_UNREADABLE truncated PNG"
            assert decision.lineage.run_id == RUN
            continue
        expected = decide(*region_messages(found.key), settings.rules())
        assert decision == expected  # the same decision as the core logic on the same records
        if decision.WhichOneof("decision") == "pair":
            assert decision.pair.pair_id == pair_id(found.key, RUN)
    assert sum(d.message.WhichOneof("decision") == "pair" for d in decisions) > len(good) // 2

    codes = Counter(dict(r.headers)["spr-error-code"].decode() for r in dead)
    assert codes == {CODE_UNDECODABLE: 1, CODE_MISMATCH: 3, CODE_TIMED_OUT: 2, CODE_INVALID: 3}
    mismatched, timed_out, failed, describe_failed, dropped, margins, batched, batches = (
        _sample(name, labels) - was for (name, labels), was in zip(METRICS, before, strict=True)
    )
    assert mismatched == 3  # RECORDS_MISMATCH
    assert timed_out == 1 and failed == 1 and describe_failed == 1
    assert dropped >= 1  # the duplicated score record
    assert margins == sum(d.message.WhichOneof("decision") == "pair" for d in decisions)
    assert batched == len(good) + 1  # every good region and the NaN one went through decide_all
    assert 1 <= batches <= batched
    info = common_pb2.ErrorInfo.FromString(
        next(dict(r.headers)["spr-error-info"] for r in dead if r.key == b"bad/no-semantic")
    )
    assert info.code == CODE_TIMED_OUT and topics.semantic.name in info.message
    invalid = next(r for r in dead if r.key == b"bad/nan-score")
    assert "non-finite score" in dict(invalid.headers)["spr-error-message"].decode()


def test_a_region_that_breaks_the_batch_is_dead_lettered_alone(
    kafka_broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No real input makes decide_all raise anything but ValueError, so the bug is injected: a decide_all
    # that fails on any batch holding one poisoned region. The builder must re-decide the batch region by
    # region, dead-letter only that region (INTERNAL) and decide its batch-mates as usual.
    calls: list[int] = []

    def buggy_decide_all(regions: Any, rules: Any) -> Any:
        calls.append(len(regions))
        if any(description.region.region_id == "good/3" for description, _, _ in regions):
            raise RuntimeError("injected bug")
        return decide_all(regions, rules)

    monkeypatch.setattr("services.pairs.builder.decide_all", buggy_decide_all)
    kafka = kafka_broker.settings()
    topics, settings = _stream(kafka, "bug")
    good = [f"good/{i}" for i in range(12)]
    _produce_shuffled(kafka, topics, good)

    with _running(PairBuilder(settings, kafka)):
        decisions = read_topic(kafka, topics.pairs, lambda found: len(found) >= len(good) - 1, timeout_s=60)
        dead = read_raw(kafka, topics.dead_letters.name, 1, lambda found: len(found) >= 3, timeout_s=30)

    assert sorted(d.message.region_id for d in decisions) == sorted(set(good) - {"good/3"})
    for found in decisions:
        assert found.message == decide(*region_messages(found.key), settings.rules())
    assert {r.key for r in dead} == {b"good/3"} and len(dead) == 3  # its three records
    assert {dict(r.headers)["spr-error-code"].decode() for r in dead} == {CODE_INTERNAL}
    assert "RuntimeError: injected bug" in dict(dead[0].headers)["spr-error-message"].decode()
    assert max(calls) > 1  # the poisoned region was first decided in a batch with others


def test_decisions_land_on_the_partition_of_their_inputs(kafka_broker: BrokerProcess) -> None:
    # Partition p of `pairs` must hold the decisions of input partition p (the restart scan relies on it),
    # even when the inputs' producer placed regions by another rule than Kafka's key hash (librdkafka's
    # default partitioner, for one, hashes keys differently).
    kafka = kafka_broker.settings()
    topics, settings = _stream(kafka, "placed")
    regions = {f"placed/{i}": i % topics.pairs.partitions for i in range(9)}
    with ProtoProducer(kafka) as producer:
        for region_id, partition in regions.items():
            inputs = (topics.descriptions, topics.localization, topics.semantic)
            for topic, message in zip(inputs, region_messages(region_id), strict=True):
                producer.send(topic, region_id, message, partition=partition)
    hashed = {region_id: murmur2(region_id.encode()) & 0x7FFFFFFF for region_id in regions}
    assert any(hashed[r] % topics.pairs.partitions != p for r, p in regions.items())  # not the hash's

    with _running(PairBuilder(settings, kafka)):
        decisions = read_topic(kafka, topics.pairs, lambda found: len(found) >= len(regions), timeout_s=60)

    assert {d.key: d.partition for d in decisions} == regions
