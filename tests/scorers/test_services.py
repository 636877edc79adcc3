"""Both scorers as services: gRPC statuses of bad input, and identical scores via gRPC and Kafka."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from kafka import KafkaConsumer

from services.common.errors import error_code_of
from services.common.grpc_server import GrpcServer, build_server, make_channel
from services.common.kafka_io import KafkaSettings, ProtoProducer, Topic, ensure_topics
from services.devstack.broker import BrokerProcess
from services.scorers.localization import servicer as loc_servicer
from services.scorers.localization import stage as loc_stage
from services.scorers.localization.logic import LocalizationScorer
from services.scorers.localization.settings import LocalizationSettings
from services.scorers.semantic import servicer as sem_servicer
from services.scorers.semantic import stage as sem_stage
from services.scorers.semantic.logic import SemanticScorer
from services.scorers.semantic.settings import SemanticSettings
from services.scorers.settings import ScorerStageSettings
from spr.v1 import common_pb2, describer_pb2, scoring_pb2, scoring_pb2_grpc
from tests.scorers.conftest import candidates, make_region, scene_png

SERVER: dict[str, Any] = {"port": 0, "metrics_enabled": False, "grace_period_s": 0.0, "max_workers": 2}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def scorers(tiny_models: dict[str, Path]) -> tuple[LocalizationScorer, SemanticScorer]:
    loc = LocalizationScorer(
        LocalizationSettings(model=str(tiny_models["tiny-grounding-dino"]), box_threshold=0.2, **SERVER)
    )
    sem = SemanticScorer(SemanticSettings(model=str(tiny_models["tiny-clip"]), **SERVER))
    return loc, sem


@pytest.fixture(scope="module")
def servers(scorers: tuple[LocalizationScorer, SemanticScorer]) -> Iterator[tuple[GrpcServer, GrpcServer]]:
    loc, sem = scorers
    made = (
        build_server(loc.settings, loc_servicer.register_with(loc)),
        build_server(sem.settings, sem_servicer.register_with(sem)),
    )
    for server in made:
        server.start()
    yield made
    for server in made:
        server.stop(grace=0)


@pytest.fixture(scope="module")
def stubs(
    servers: tuple[GrpcServer, GrpcServer],
) -> Iterator[tuple[scoring_pb2_grpc.LocalizationScorerStub, scoring_pb2_grpc.SemanticScorerStub]]:
    with make_channel(f"127.0.0.1:{servers[0].port}") as a, make_channel(f"127.0.0.1:{servers[1].port}") as b:
        yield scoring_pb2_grpc.LocalizationScorerStub(a), scoring_pb2_grpc.SemanticScorerStub(b)


def request(**fields: Any) -> scoring_pb2.ScoreRequest:
    values: dict[str, Any] = {
        "region": make_region(),
        "candidates": candidates(8),
        "image_bytes": scene_png(),
    }
    values.update(fields)
    return scoring_pb2.ScoreRequest(**values)


BAD_INPUTS = [
    ({"image_bytes": b"GIF89a broken"}, grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_UNDECODABLE"),
    ({"candidates": []}, grpc.StatusCode.INVALID_ARGUMENT, "NO_CANDIDATES"),
    ({"candidates": candidates(40)}, grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_CANDIDATES"),
    (
        {
            "candidates": [
                describer_pb2.Candidate(candidate_id="a"),
                describer_pb2.Candidate(candidate_id="a"),
            ]
        },
        grpc.StatusCode.INVALID_ARGUMENT,
        "CANDIDATE_INVALID",
    ),
    (
        {"region": common_pb2.Region(region_id="r", box=common_pb2.Box(x1=150, y1=0, x2=400, y2=50))},
        grpc.StatusCode.INVALID_ARGUMENT,
        "REGION_OUT_OF_BOUNDS",
    ),
    (
        {"region": common_pb2.Region(region_id="r", box=common_pb2.Box(x1=50, y1=0, x2=10, y2=50))},
        grpc.StatusCode.INVALID_ARGUMENT,
        "REGION_INVALID",
    ),
    ({"region": common_pb2.Region(region_id="r")}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
    (
        {"image_bytes": b"", "region": make_region(uri="/nonexistent/scene.png")},
        grpc.StatusCode.NOT_FOUND,
        "IMAGE_NOT_FOUND",
    ),
    ({"image_bytes": b""}, grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_MISSING"),
]


@pytest.mark.parametrize(("fields", "status", "code"), BAD_INPUTS)
@pytest.mark.parametrize("service", [0, 1])
def test_bad_inputs_get_their_status_and_code(
    stubs: tuple[Any, Any], service: int, fields: dict[str, Any], status: grpc.StatusCode, code: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stubs[service].Score(request(**fields), timeout=30)
    assert info.value.code() == status
    assert error_code_of(info.value) == code


def test_both_services_score_and_name_their_model(stubs: tuple[Any, Any]) -> None:
    loc = stubs[0].Score(request(), timeout=30)
    sem = stubs[1].Score(request(), timeout=30)
    assert [s.candidate_id for s in loc.scores] == [c.candidate_id for c in candidates(8)]
    assert loc.scores[0].s_loc == pytest.approx(1.0)
    assert loc.scorer_id.startswith("grounding-dino:") and sem.scorer_id.startswith("clip:")
    assert len(sem.scores) == 8


# --- Kafka -----------------------------------------------------------------------------------------


def read_all(settings: KafkaSettings, topic: str, count: int, timeout: float = 30.0) -> list[Any]:
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


def parse(message_type: type[Message], raw: bytes) -> Any:
    message = message_type()
    message.ParseFromString(raw)
    return message


@pytest.mark.integration
def test_kafka_stage_scores_equal_grpc_scores_and_bad_records_are_dead_lettered(
    kafka_broker: BrokerProcess,
    scorers: tuple[LocalizationScorer, SemanticScorer],
    stubs: tuple[Any, Any],
    tmp_path: Path,
) -> None:
    kafka = kafka_broker.settings()
    image = tmp_path / "scene.png"
    image.write_bytes(scene_png())
    descriptions, dead = unique("descriptions"), unique("descriptions.dlq")
    outputs = {"loc": unique("scores.localization"), "sem": unique("scores.semantic")}
    ensure_topics(
        kafka,
        [Topic(t, describer_pb2.DescriptionRecord) for t in (descriptions, dead, *outputs.values())],
    )
    lineage = common_pb2.Lineage(policy_model_id="tiny-qwen", adapter_version="spr-v1-abc", run_id="t")
    good = describer_pb2.DescriptionRecord(
        region=make_region(uri=image.as_uri()), candidates=candidates(8), lineage=lineage
    )
    bad = describer_pb2.DescriptionRecord(
        region=make_region("region-2", uri="/missing.png"), candidates=candidates(2)
    )
    producer = ProtoProducer(kafka)
    topic = Topic(descriptions, describer_pb2.DescriptionRecord)
    producer.send(topic, "region-1", good)
    producer.send(topic, "region-2", bad)
    producer.flush()
    producer.close()

    made: list[Any] = []
    pairs: dict[str, tuple[Any, Any]] = {"loc": (scorers[0], loc_stage), "sem": (scorers[1], sem_stage)}
    for key, (scorer, module) in pairs.items():
        stage_settings = ScorerStageSettings(
            descriptions_topic=descriptions,
            scores_topic=outputs[key],
            dead_letter_topic=dead,
            group_id=unique(key),
            retry_backoff_s=0.1,
        )
        scorer.settings = scorer.settings.model_copy(update={"stage": stage_settings})
        made.append(module.make_stage(scorer, kafka))
    try:
        deadline = time.monotonic() + 180  # generous: CPU models on 2 loaded cores (returns when done)
        results: dict[str, list[Any]] = {}
        while time.monotonic() < deadline and len(results) < 2:
            for stage in made:
                stage.step(timeout_ms=500)
            results = {k: v for k in outputs if (v := read_all(kafka, outputs[k], 1, timeout=1))}
    finally:
        for stage in made:
            stage.close()

    loc_record = parse(scoring_pb2.LocalizationScoreRecord, results["loc"][0].value)
    sem_record = parse(scoring_pb2.SemanticScoreRecord, results["sem"][0].value)
    assert results["loc"][0].key == b"region-1"
    via_grpc_loc = stubs[0].Score(request(region=good.region), timeout=30)
    via_grpc_sem = stubs[1].Score(request(region=good.region), timeout=30)
    assert list(loc_record.scores) == list(via_grpc_loc.scores)  # identical messages, not just close
    assert list(sem_record.scores) == list(via_grpc_sem.scores)
    assert loc_record.lineage.localization_scorer_id == via_grpc_loc.scorer_id
    assert sem_record.lineage.semantic_scorer_id == via_grpc_sem.scorer_id
    assert loc_record.lineage.adapter_version == "spr-v1-abc"

    letters = read_all(kafka, dead, 2)
    assert len(letters) == 2  # the bad record, once per scorer stage
    assert {dict(r.headers)["spr-error-code"] for r in letters} == {b"IMAGE_NOT_FOUND"}
    assert {dict(r.headers)["spr-error-stage"] for r in letters} == {
        b"localization_scorer",
        b"semantic_scorer",
    }
    # ...and on each score topic a record carrying the error, so the pair builder need not wait for it
    for key, message_type in (
        ("loc", scoring_pb2.LocalizationScoreRecord),
        ("sem", scoring_pb2.SemanticScoreRecord),
    ):
        failed = [
            parse(message_type, r.value) for r in read_all(kafka, outputs[key], 2) if r.key == b"region-2"
        ]
        assert len(failed) == 1 and not failed[0].scores and failed[0].error.code == "IMAGE_NOT_FOUND"


def test_kafka_stages_pass_a_describer_error_on_without_scoring(
    kafka_broker: BrokerProcess, scorers: tuple[LocalizationScorer, SemanticScorer]
) -> None:
    """A description that carries the describer's error has nothing to score: each scorer stage
    outputs a score record with that error, so the pair builder decides the region at once."""
    error = common_pb2.ErrorInfo(stage="describer", code="IMAGE_UNREADABLE", message="truncated")
    lineage = common_pb2.Lineage(policy_model_id="tiny-qwen", run_id="t")
    failed = describer_pb2.DescriptionRecord(
        region=make_region(uri="/never/read.png"), lineage=lineage, error=error
    )
    for scorer, module in ((scorers[0], loc_stage), (scorers[1], sem_stage)):
        stage = module.make_stage(scorer, kafka_broker.settings())
        try:
            out = stage.spec.handle(failed, time.monotonic() + 5)
        finally:
            stage.close()
        assert out.error == error and not out.scores
        assert out.region_id == failed.region.region_id and out.lineage.run_id == "t"
