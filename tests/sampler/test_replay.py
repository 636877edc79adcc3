"""spr-replay on a real broker: a topic range copied once into a run-scoped topic, stamped with the run."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from kafka import KafkaConsumer

from services.common.kafka_io import KafkaSettings, ProtoProducer, Topic, ensure_topics
from services.core.pairs import pair_id
from services.devstack.broker import BrokerProcess
from services.sampler.replay import HEADER_RUN, HEADER_SOURCE, ReplaySettings, main, replay
from spr.v1 import common_pb2, describer_pb2

pytestmark = pytest.mark.integration


def description(region_id: str) -> describer_pb2.DescriptionRecord:
    lineage = common_pb2.Lineage(run_id="live", localization_scorer_id="gdino@1", semantic_scorer_id="clip@1")
    return describer_pb2.DescriptionRecord(
        region=common_pb2.Region(region_id=region_id),
        candidates=[describer_pb2.Candidate(candidate_id=f"{region_id}/0", text="a cat")],
        lineage=lineage,
    )


def produce(kafka: KafkaSettings, topic: Topic[Any], ids: list[str]) -> None:
    with ProtoProducer(kafka) as producer:
        for region_id in ids:
            producer.send(topic, region_id, description(region_id))
        producer.flush(30)


def read_all(kafka: KafkaSettings, topic: str, idle_s: float = 1.5) -> list[Any]:
    consumer = KafkaConsumer(
        topic, **kafka.common_kwargs(), auto_offset_reset="earliest", enable_auto_commit=False
    )
    got: list[Any] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            for batch in consumer.poll(timeout_ms=300).values():
                got.extend(batch)
                last = time.monotonic()
    finally:
        consumer.close()
    return got


def replay_settings(kafka: KafkaSettings, source: str, run_id: str, **extra: Any) -> ReplaySettings:
    version = ".".join(map(str, kafka.api_version)) if kafka.api_version else None
    return ReplaySettings(
        bootstrap_servers=kafka.bootstrap_servers,
        api_version=version,
        run_id=run_id,
        source_topic=source,
        source_kind="descriptions",
        **extra,
    )


@pytest.fixture
def source(kafka_broker: BrokerProcess) -> Topic[describer_pb2.DescriptionRecord]:
    topic = Topic(f"descriptions-{uuid.uuid4().hex[:8]}", describer_pb2.DescriptionRecord, partitions=3)
    ensure_topics(kafka_broker.settings(), [topic])
    return topic


def test_a_replay_copies_the_range_once_as_a_new_run_and_resumes(
    kafka_broker: BrokerProcess, source: Topic[describer_pb2.DescriptionRecord]
) -> None:
    kafka = kafka_broker.settings()
    first = [f"region-{i}" for i in range(8)]
    produce(kafka, source, first)

    report = replay(replay_settings(kafka, source.name, "rescore-2"))
    assert report.target_topic == f"{source.name}.rescore-2"
    assert sum(report.copied.values()) == 8
    originals = {r.key: r for r in read_all(kafka, source.name)}
    copies = read_all(kafka, report.target_topic)
    assert sorted(r.key for r in copies) == sorted(originals)
    for copy in copies:
        record = describer_pb2.DescriptionRecord.FromString(copy.value)
        assert record.lineage.run_id == "rescore-2"
        assert (record.lineage.localization_scorer_id, record.lineage.semantic_scorer_id) == ("", "")
        assert list(record.candidates) == list(description(copy.key.decode()).candidates)
        headers = dict(copy.headers)
        original = originals[copy.key]
        assert headers[HEADER_RUN] == b"rescore-2"
        assert headers[HEADER_SOURCE] == f"{original.partition}:{original.offset}".encode()
        assert copy.partition == original.partition  # same key, same partition: the join stays local
    assert pair_id("region-0", "rescore-2") != pair_id("region-0", "live")

    # Run again (e.g. after a crash): nothing is copied twice; new source records are picked up.
    assert sum(replay(replay_settings(kafka, source.name, "rescore-2")).copied.values()) == 0
    produce(kafka, source, ["region-8", "region-9"])
    assert sum(replay(replay_settings(kafka, source.name, "rescore-2")).copied.values()) == 2
    assert len(read_all(kafka, report.target_topic)) == 10


def test_a_replay_selects_by_offsets_and_by_timestamps(
    kafka_broker: BrokerProcess,
    source: Topic[describer_pb2.DescriptionRecord],
    capsys: pytest.CaptureFixture[str],
) -> None:
    kafka = kafka_broker.settings()
    produce(kafka, source, [f"old-{i}" for i in range(6)])
    time.sleep(0.05)
    boundary = int(time.time() * 1000)
    time.sleep(0.05)
    produce(kafka, source, [f"new-{i}" for i in range(4)])
    originals = read_all(kafka, source.name)

    by_time = replay(replay_settings(kafka, source.name, "since", from_time_ms=boundary))
    assert sorted(r.key for r in read_all(kafka, by_time.target_topic)) == [
        f"new-{i}".encode() for i in range(4)
    ]

    version = ".".join(map(str, kafka.api_version)) if kafka.api_version else ""
    argv = [
        "--bootstrap-servers",
        kafka.bootstrap_servers,
        "--run-id",
        "window",
        "--source-topic",
        source.name,
    ]
    argv += ["--source-kind", "descriptions", "--from-offset", "1", "--to-offset", "2"]
    main([*argv, "--api-version", version] if version else argv)
    printed = json.loads(capsys.readouterr().out)
    expected = sorted(r.key for r in originals if r.offset == 1)
    assert sorted(r.key for r in read_all(kafka, printed["target_topic"])) == expected
    assert printed["stage_env"]["SPR_PAIRS_RUN_ID"] == "window"
    assert printed["stage_env"]["SPR_LOCALIZATION_STAGE__DESCRIPTIONS_TOPIC"] == printed["target_topic"]
