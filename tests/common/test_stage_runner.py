"""The shared stage runner on a real broker: batching, pause/resume, commit after produce, retries,
dead letters and the SIGTERM drain.

The handlers here are small functions of the test (echo, slow echo, failing echo): they stand in for
a model, which is what the runner is independent of; the broker, the consumer group and the
producer are real. ``python -m tests.common.test_stage_runner BOOTSTRAP IMPL ...`` runs one stage
process for the SIGTERM test.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from services.common.errors import SprError
from services.common.kafka_io import SCHEMA_HEADER, KafkaSettings, ProtoProducer, Topic, ensure_topics
from services.common.stage_runner import (
    BATCH_RECORDS,
    PRODUCER_RECOVERIES,
    RECORDS,
    RunnerSettings,
    StageRunner,
    StageSpec,
    serve_stage,
)
from services.devstack.broker import BrokerProcess, client_settings
from spr.v1 import common_pb2

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


class Flaky(SprError):
    """A retryable failure (what a Triton outage looks like to a stage)."""

    code = "TEST_FLAKY"
    retryable = True


class Rejected(SprError):
    """A failure retrying cannot fix (what a bad image looks like)."""

    code = "TEST_REJECTED"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def echo(region: common_pb2.Region, deadline: float) -> common_pb2.Region:
    return common_pb2.Region(region_id=region.region_id, sampler_version="echoed")


def make_spec(name: str, handle: Any, partitions: int = 1, kafka: KafkaSettings | None = None) -> StageSpec:  # type: ignore[type-arg]
    spec: StageSpec[common_pb2.Region, common_pb2.Region] = StageSpec(
        name=name,
        input=Topic(unique("in"), common_pb2.Region, partitions=partitions),
        output=Topic(unique("out"), common_pb2.Region, partitions=partitions),
        dead_letter_topic=unique("in.dlq"),
        group_id=unique("group"),
        handle=handle,
    )
    if kafka is not None:
        create_topics(kafka, spec)
    return spec


def create_topics(kafka: KafkaSettings, spec: StageSpec) -> None:  # type: ignore[type-arg]
    dead = Topic(spec.dead_letter_topic, common_pb2.ErrorInfo)
    ensure_topics(kafka, [spec.input, spec.output, dead])


def send_regions(kafka: KafkaSettings, topic: Topic[common_pb2.Region], ids: Iterable[str]) -> None:
    with ProtoProducer(kafka) as producer:
        for region_id in ids:
            producer.send(topic, region_id, common_pb2.Region(region_id=region_id))
        producer.flush(30)


def read_all(kafka: KafkaSettings, topic: str, count: int, timeout: float = 20.0) -> list[Any]:
    """Raw records of ``topic`` from the beginning (no group) until ``count`` arrived or the timeout."""
    consumer = KafkaConsumer(
        topic, **kafka.common_kwargs(), auto_offset_reset="earliest", enable_auto_commit=False
    )
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                got.extend(records)
    finally:
        consumer.close()
    return got


def committed(runner: StageRunner[Any, Any], partition: int = 0) -> int | None:
    return runner.consumer.raw.committed(TopicPartition(runner.spec.input.name, partition))  # type: ignore[no-any-return]


def step_until(runner: StageRunner[Any, Any], done: Any, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        runner.step()
    assert done(), "condition not reached in time"


def counted(stage: str, outcome: str) -> float:
    return RECORDS.labels(stage, outcome)._value.get()  # type: ignore[no-any-return]


@pytest.fixture
def runners() -> Iterator[list[StageRunner[Any, Any]]]:
    made: list[StageRunner[Any, Any]] = []
    yield made
    for runner in made:
        runner.close()


def test_records_are_batched_produced_in_order_and_committed_after_the_acks(
    kafka_broker: BrokerProcess, runners: list[StageRunner[Any, Any]]
) -> None:
    kafka = kafka_broker.settings()
    spec = make_spec("echo_batches", echo, kafka=kafka)
    ids = [f"r{i:02d}" for i in range(12)]
    send_regions(kafka, spec.input, ids)
    batches_before = BATCH_RECORDS.labels(spec.name)._sum.get()
    settings = RunnerSettings(batch_size=5, batch_max_wait_s=0.5, concurrency=3, max_in_flight=10)
    runner = StageRunner(spec, settings, kafka)
    runners.append(runner)

    step_until(runner, lambda: committed(runner) == len(ids))

    outputs = read_all(kafka, spec.output.name, len(ids))
    assert [r.key.decode() for r in outputs] == ids  # one partition: offset order kept across batches
    assert {common_pb2.Region.FromString(r.value).sampler_version for r in outputs} == {"echoed"}
    assert BATCH_RECORDS.labels(spec.name)._sum.get() - batches_before == len(ids)
    assert counted(spec.name, "produced") == len(ids)
    assert counted(spec.name, "consumed") == len(ids)
    assert runner.in_flight == 0


def test_a_slow_handler_pauses_the_partitions_and_the_member_is_never_evicted(
    kafka_broker: BrokerProcess, runners: list[StageRunner[Any, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    # Three records of 2.5 s each in one batch take 7.5 s: longer than max.poll.interval (6.5 s). A
    # loop that polled only between batches would be evicted and the records handled twice.
    kafka = replace(kafka_broker.settings(), max_poll_interval_ms=6_500)
    revoked: list[tuple[set[TopicPartition], int]] = []  # partitions taken away, records held then
    handled: list[str] = []

    def slow(region: common_pb2.Region, deadline: float) -> common_pb2.Region:
        handled.append(region.region_id)
        time.sleep(2.5)
        return echo(region, deadline)

    class Watched(StageRunner[common_pb2.Region, common_pb2.Region]):
        def on_partitions_revoked(self, partitions: Iterable[TopicPartition]) -> None:
            if partitions:  # the first join "revokes" the empty assignment
                revoked.append((set(partitions), self.in_flight))
            super().on_partitions_revoked(partitions)

    spec = make_spec("slow_echo", slow, kafka=kafka)
    settings = RunnerSettings(batch_size=3, batch_max_wait_s=1.0, concurrency=1, max_in_flight=3)
    runner = Watched(spec, settings, kafka)
    runners.append(runner)
    # Join first: kafka-python may join twice at start-up when a join outlasts one poll() (a
    # rebalance with nothing held, which is not what this test is about), so the slow work starts
    # only once the member owns its partition.
    step_until(runner, lambda: bool(runner.consumer.raw.assignment()), timeout=30)
    joined_at = len(revoked)
    caplog.set_level(logging.INFO, logger="kafka.coordinator")
    send_regions(kafka, spec.input, ["a", "b", "c"])
    saw_paused = False

    def finished() -> bool:
        nonlocal saw_paused
        saw_paused = saw_paused or bool(runner.consumer.raw.paused())
        return committed(runner) == 3

    step_until(runner, finished, timeout=60)
    group_log = [r.getMessage() for r in caplog.records if r.name.startswith("kafka.coordinator")]
    assert saw_paused
    assert revoked[joined_at:] == [], group_log  # never left the group while the slow work ran
    assert handled == ["a", "b", "c"], group_log  # so no record was handled twice
    assert [r.key for r in read_all(kafka, spec.output.name, 4, timeout=3)] == [b"a", b"b", b"c"]
    assert runner.consumer.raw.paused() == set()  # resumed once the work was done


def test_a_retryable_failure_is_retried_with_growing_backoff_then_succeeds_in_order(
    kafka_broker: BrokerProcess, runners: list[StageRunner[Any, Any]]
) -> None:
    kafka = kafka_broker.settings()
    attempts: list[float] = []

    def flaky(region: common_pb2.Region, deadline: float) -> common_pb2.Region:
        if region.region_id == "flaky":
            attempts.append(time.monotonic())
            if len(attempts) <= 2:
                raise Flaky("not yet")
        return echo(region, deadline)

    spec = make_spec("flaky_echo", flaky, kafka=kafka)
    send_regions(kafka, spec.input, ["before", "flaky", "after"])
    settings = RunnerSettings(batch_size=3, retry_backoff_s=0.4, retry_backoff_max_s=5.0)
    runner = StageRunner(spec, settings, kafka)
    runners.append(runner)

    step_until(runner, lambda: committed(runner) == 3)

    assert len(attempts) == 3
    assert attempts[1] - attempts[0] >= 0.4  # first backoff
    assert attempts[2] - attempts[1] >= 0.8  # doubled
    assert [r.key for r in read_all(kafka, spec.output.name, 3)] == [b"before", b"flaky", b"after"]
    assert counted(spec.name, "retried") == 2
    assert read_all(kafka, spec.dead_letter_topic, 1, timeout=1) == []


def test_failures_go_to_the_dead_letter_topic_with_the_error_in_headers(
    kafka_broker: BrokerProcess, runners: list[StageRunner[Any, Any]]
) -> None:
    kafka = kafka_broker.settings()

    def picky(region: common_pb2.Region, deadline: float) -> common_pb2.Region:
        if region.region_id == "bad":
            raise Rejected("no such image")
        if region.region_id == "bug":
            raise ZeroDivisionError("oops")
        return echo(region, deadline)

    spec = make_spec("picky_echo", picky, kafka=kafka)
    send_regions(kafka, spec.input, ["good", "bad", "bug"])
    with KafkaProducer(**kafka.producer_kwargs()) as raw:  # a record of another schema
        headers = [(SCHEMA_HEADER, b"spr.v1.PairDecision/1"), ("trace", b"t-1")]
        raw.send(spec.input.name, key=b"alien", value=b"\x0a\x01x", headers=headers).get(timeout=30)
    runner = StageRunner(spec, RunnerSettings(batch_size=4), kafka)
    runners.append(runner)

    step_until(runner, lambda: committed(runner) == 4)

    assert [r.key for r in read_all(kafka, spec.output.name, 1)] == [b"good"]
    letters = {r.key: r for r in read_all(kafka, spec.dead_letter_topic, 3)}
    assert set(letters) == {b"bad", b"bug", b"alien"}
    codes = {key: dict(r.headers)["spr-error-code"] for key, r in letters.items()}
    assert codes == {b"bad": b"TEST_REJECTED", b"bug": b"INTERNAL", b"alien": b"RECORD_UNDECODABLE"}
    bad = dict(letters[b"bad"].headers)
    assert bad["spr-error-message"] == b"no such image"
    assert bad["spr-error-stage"] == b"picky_echo"
    info = common_pb2.ErrorInfo.FromString(bad["spr-error-info"])
    assert (info.stage, info.code, info.source_topic, info.source_offset) == (
        "picky_echo",
        "TEST_REJECTED",
        spec.input.name,
        1,
    )
    assert letters[b"bad"].value == common_pb2.Region(region_id="bad").SerializeToString()
    alien = dict(letters[b"alien"].headers)
    assert letters[b"alien"].value == b"\x0a\x01x"  # verbatim, with its own headers kept
    assert (alien["trace"], alien[SCHEMA_HEADER]) == (b"t-1", b"spr.v1.PairDecision/1")
    assert counted(spec.name, "dead_lettered") == 3


def test_a_failure_output_tells_downstream_besides_the_dead_letter(
    kafka_broker: BrokerProcess, runners: list[StageRunner[Any, Any]]
) -> None:
    """With ``on_failure`` (the scorers), a record that fails for good also yields an output carrying
    the error, so that a join downstream decides at once; undecodable records only get dead letters."""
    kafka = kafka_broker.settings()

    def picky(region: common_pb2.Region, deadline: float) -> common_pb2.Region:
        if region.region_id == "bad":
            raise Rejected("no such image")
        return echo(region, deadline)

    def failure(region: common_pb2.Region, error: common_pb2.ErrorInfo) -> common_pb2.Region:
        return common_pb2.Region(region_id=region.region_id, sampler_version=f"failed:{error.code}")

    spec = replace(make_spec("failure_echo", picky), on_failure=failure)
    create_topics(kafka, spec)
    send_regions(kafka, spec.input, ["good", "bad"])
    with KafkaProducer(**kafka.producer_kwargs()) as raw:
        raw.send(spec.input.name, key=b"alien", value=b"\x00", headers=[(SCHEMA_HEADER, b"x/1")]).get(30)
    runner = StageRunner(spec, RunnerSettings(batch_size=4), kafka)
    runners.append(runner)

    step_until(runner, lambda: committed(runner) == 3)

    outputs = {r.key: common_pb2.Region.FromString(r.value) for r in read_all(kafka, spec.output.name, 2)}
    assert {key: o.sampler_version for key, o in outputs.items()} == {
        b"good": "echoed",
        b"bad": "failed:TEST_REJECTED",
    }
    assert {r.key for r in read_all(kafka, spec.dead_letter_topic, 2)} == {b"bad", b"alien"}


def test_sigterm_drains_the_records_in_flight_before_the_process_exits(
    kafka_broker: BrokerProcess, tmp_path: Path
) -> None:
    kafka = kafka_broker.settings()
    spec = make_spec("drain_echo", echo, kafka=kafka)
    ids = ["d1", "d2", "d3", "d4"]
    send_regions(kafka, spec.input, ids)
    started = tmp_path / "started"
    argv = [
        sys.executable,
        "-m",
        "tests.common.test_stage_runner",
        kafka.bootstrap_servers,
        kafka_broker.impl.value,
        spec.input.name,
        spec.output.name,
        spec.dead_letter_topic,
        spec.group_id,
        str(started),
    ]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (started.exists() and len(started.read_text()) >= len(ids)):
            assert process.poll() is None and time.monotonic() < deadline, "stage did not start its batch"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)  # every record is in a handler that sleeps 3 s more
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert sorted(r.key.decode() for r in read_all(kafka, spec.output.name, 4)) == ids
    group = KafkaConsumer(**kafka.consumer_kwargs(spec.group_id))
    try:
        assert group.committed(TopicPartition(spec.input.name, 0)) == len(ids), output
    finally:
        group.close()


def _serve_slow_echo(argv: list[str]) -> None:
    """The stage process of the SIGTERM test: each record sleeps 3 s after noting that it started."""
    bootstrap, impl, source, target, dead, group, started = argv
    lock = threading.Lock()

    def slow(region: common_pb2.Region, deadline: float) -> common_pb2.Region:
        with lock, open(started, "a") as marks:
            marks.write("x")
        time.sleep(3)
        return echo(region, deadline)

    spec: StageSpec[common_pb2.Region, common_pb2.Region] = StageSpec(
        name="drain_echo",
        input=Topic(source, common_pb2.Region),
        output=Topic(target, common_pb2.Region),
        dead_letter_topic=dead,
        group_id=group,
        handle=slow,
    )
    settings = RunnerSettings(batch_size=4, batch_max_wait_s=1.0, concurrency=4)
    serve_stage(StageRunner(spec, settings, client_settings(impl, bootstrap)), 0, "127.0.0.1", False)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _serve_slow_echo(sys.argv[1:])


def test_outputs_never_acknowledged_are_resent_by_new_producers_after_the_ack_timeout(
    kafka_broker: BrokerProcess, broker_factory: Any, runners: list[StageRunner[Any, Any]]
) -> None:
    """A producer whose sends are never acknowledged while the broker of the stage answers everything
    else: past ``ack_timeout_s`` the stage replaces its producers and re-reads from the first
    unacknowledged record, and every record gets its output and its commit.

    The real trigger, an idempotent producer stuck after a restarted broker lost its sequence state,
    cannot be produced on demand; here the stage's first producer is connected to a second, frozen
    (SIGSTOP) broker instead, which leaves its sends unacknowledged in the same way.
    """
    kafka = kafka_broker.settings()
    spec = make_spec("echo_ack_timeout", echo, kafka=kafka)
    ids = [f"a{i:02d}" for i in range(6)]
    send_regions(kafka, spec.input, ids)
    recoveries = PRODUCER_RECOVERIES.labels(spec.name)._value.get()
    runner = StageRunner(spec, RunnerSettings(batch_size=3, ack_timeout_s=1.5), kafka)
    runners.append(runner)
    frozen = broker_factory()
    create_topics(frozen.settings(), spec)
    runner.producer.close()
    runner.producer = ProtoProducer(frozen.settings())
    runner.producer.send_and_wait(spec.output, "warm-up", common_pb2.Region())  # metadata known: no block
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        step_until(runner, lambda: committed(runner) == len(ids), timeout=60)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert PRODUCER_RECOVERIES.labels(spec.name)._value.get() - recoveries == 1
    outputs = read_all(kafka, spec.output.name, len(ids))
    assert [r.key.decode() for r in outputs] == ids
