"""The Kafka stage on a real broker: regions -> descriptions, failures dead-lettered, outages retried."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from services.common.kafka_io import (
    SCHEMA_HEADER,
    KafkaSettings,
    ProtoProducer,
    Topic,
    ensure_topics,
)
from services.common.stage_runner import RECORDS
from services.describer.logic import Describer
from services.describer.settings import StageSettings
from services.describer.stage import STAGE_NAME, DescriberStage
from services.devstack.broker import BrokerProcess
from services.devstack.triton import TritonServer
from spr.v1 import common_pb2, describer_pb2
from tests.describer.conftest import scene_png
from tests.describer.test_logic import make_settings

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def topics(kafka_broker: BrokerProcess) -> StageSettings:
    """Stage settings on topics and a group of this test's own."""
    stage = StageSettings(
        regions_topic=unique("regions"),
        descriptions_topic=unique("descriptions"),
        dead_letter_topic=unique("descriptions.dlq"),
        group_id=unique("describer"),
        retry_backoff_s=0.1,
        request_timeout_s=60.0,
    )
    ensure_topics(
        kafka_broker.settings(),
        [
            Topic(stage.regions_topic, common_pb2.Region),
            Topic(stage.descriptions_topic, describer_pb2.DescriptionRecord),
            Topic(stage.dead_letter_topic, common_pb2.Region),
        ],
    )
    return stage


def region(region_id: str, uri: str, box: common_pb2.Box) -> common_pb2.Region:
    members = [common_pb2.AnnotatedObject(annotation_id=1, category="red circle", box=box)]
    return common_pb2.Region(
        region_id=region_id,
        image=common_pb2.ImageRef(uri=uri, width=200, height=150),
        box=box,
        members=members,
        ground_truth=members,
        sampler_version="test-sampler/1",
    )


def read_all(settings: KafkaSettings, topic: str, count: int, timeout: float = 30.0) -> list[Any]:
    """Raw records (headers included) of ``topic`` from the beginning, without a group."""
    consumer = KafkaConsumer(
        topic, **settings.common_kwargs(), auto_offset_reset="earliest", enable_auto_commit=False
    )
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend(records)
    finally:
        consumer.close()
    return got


@pytest.fixture
def image_uri(tmp_path: Path) -> str:
    path = tmp_path / "scene.png"
    path.write_bytes(scene_png())
    return path.as_uri()


@pytest.fixture
def stage_factory(kafka_broker: BrokerProcess) -> Iterator[Any]:
    made: list[tuple[DescriberStage, Describer]] = []

    def make(stage_settings: StageSettings, **describer_settings: Any) -> DescriberStage:
        describer = Describer(make_settings(stage=stage_settings.model_dump(), **describer_settings))
        stage = DescriberStage(describer, describer.settings.stage, kafka_broker.settings())
        made.append((stage, describer))
        return stage

    yield make
    for stage, describer in made:
        stage.close()
        describer.close()


def test_regions_become_descriptions_and_bad_records_are_dead_lettered(
    kafka_broker: BrokerProcess,
    topics: StageSettings,
    triton: TritonServer,
    tiny_qwen25: Path,
    image_uri: str,
    stage_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = kafka_broker.settings()
    good = region("r-good", image_uri, common_pb2.Box(x1=10, y1=10, x2=90, y2=90))
    outside = region("r-outside", image_uri, common_pb2.Box(x1=150, y1=100, x2=400, y2=140))
    with ProtoProducer(settings) as producer:
        regions = Topic(topics.regions_topic, common_pb2.Region)
        producer.send_and_wait(regions, good.region_id, good)
        producer.send_and_wait(regions, outside.region_id, outside)
    with KafkaProducer(**settings.producer_kwargs()) as raw:  # a record of the wrong schema
        headers = [(SCHEMA_HEADER, b"spr.v1.PairDecision/1")]
        raw.send(topics.regions_topic, key=b"r-alien", value=b"\x0a\x01x", headers=headers).get(timeout=30)

    stage = stage_factory(
        topics,
        triton_url=triton.grpc_url,
        processor_config=tiny_qwen25 / "processor_config.json",
        sampling={"num_samples": 3, "max_new_tokens": 8},
    )
    deadline = time.monotonic() + 60
    dlq: list[Any] = []
    descriptions: list[Any] = []
    partition = TopicPartition(topics.regions_topic, 0)
    while time.monotonic() < deadline and stage.consumer.raw.committed(partition) != 3:
        stage.step(timeout_ms=500)
    descriptions = read_all(settings, topics.descriptions_topic, 2, timeout=5)
    dlq = read_all(settings, topics.dead_letter_topic, 2, timeout=5)

    # r-good described; r-outside dead-lettered AND announced downstream as a record with the error
    assert sorted(r.key for r in descriptions) == [b"r-good", b"r-outside"], caplog.text
    failed = describer_pb2.DescriptionRecord.FromString(
        next(r.value for r in descriptions if r.key == b"r-outside")
    )
    assert failed.region == outside and not failed.candidates
    assert (failed.error.stage, failed.error.code) == ("describer", "REGION_OUT_OF_BOUNDS")
    assert failed.lineage.policy_model_id and failed.lineage.sampler_version == "test-sampler/1"
    produced = next(r for r in descriptions if r.key == b"r-good")
    assert produced.key == b"r-good"
    record = describer_pb2.DescriptionRecord.FromString(produced.value)
    assert record.region == good
    assert len(record.candidates) == 3
    assert record.lineage.prompt_template_id.startswith("qwen25-vl/")
    assert record.lineage.sampler_version == "test-sampler/1"
    assert record.prompt and record.prompt_mode != describer_pb2.PROMPT_MODE_UNSPECIFIED
    # The frame the model saw: a multiple of the tiny processor's 28-pixel grid.
    assert record.frame_width > 0 and record.frame_height > 0
    assert record.frame_width % 28 == 0 and record.frame_height % 28 == 0
    if record.prompt_mode == describer_pb2.PROMPT_MODE_FULL_IMAGE_BOX:
        assert record.crop_box == common_pb2.Box(x1=0, y1=0, x2=200, y2=150)
    else:
        assert record.crop_box == good.box
    assert dict(produced.headers)[SCHEMA_HEADER] == b"spr.v1.DescriptionRecord/1"

    dead = {r.key: dict(r.headers) for r in dlq}
    assert dead[b"r-outside"]["spr-error-code"] == b"REGION_OUT_OF_BOUNDS"
    assert dead[b"r-alien"]["spr-error-code"] == b"RECORD_UNDECODABLE"
    info = common_pb2.ErrorInfo.FromString(dead[b"r-outside"]["spr-error-info"])
    assert (info.stage, info.source_topic) == ("describer", topics.regions_topic)
    assert next(r for r in dlq if r.key == b"r-outside").value == outside.SerializeToString()
    assert next(r for r in dlq if r.key == b"r-alien").value == b"\x0a\x01x"  # verbatim

    # Everything was committed, dead letters included.
    assert stage.consumer.raw.committed(partition) == 3


def test_a_triton_outage_rewinds_instead_of_dead_lettering(
    kafka_broker: BrokerProcess, topics: StageSettings, image_uri: str, stage_factory: Any
) -> None:
    settings = kafka_broker.settings()
    sent = region("r-waiting", image_uri, common_pb2.Box(x1=10, y1=10, x2=90, y2=90))
    with ProtoProducer(settings) as producer:
        producer.send_and_wait(Topic(topics.regions_topic, common_pb2.Region), sent.region_id, sent)
    stage = stage_factory(topics, retry={"max_attempts": 1})  # make_settings points at a dead port
    retried = RECORDS.labels(STAGE_NAME, "retried")
    before = retried._value.get()
    deadline = time.monotonic() + 60
    while retried._value.get() - before < 2 and time.monotonic() < deadline:
        stage.step(timeout_ms=500)  # the same record comes back after each rewind
    assert retried._value.get() - before >= 2
    assert read_all(settings, topics.dead_letter_topic, 1, timeout=1.0) == []
    assert read_all(settings, topics.descriptions_topic, 1, timeout=1.0) == []
    # Not committed either: after a restart the group starts from this record again.
    assert stage.consumer.raw.committed(TopicPartition(topics.regions_topic, 0)) is None
