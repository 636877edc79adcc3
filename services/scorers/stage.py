"""The scorers' Kafka stage: ``descriptions`` -> ``scores.localization`` / ``scores.semantic`` (SPEC §3).

Same discipline as the describer's stage (:mod:`services.describer.stage`): a consumer-group member
scores each ``DescriptionRecord`` and produces one score record keyed by the region id; offsets are
committed after the produce is acknowledged (at-least-once; candidate ids make duplicates detectable).
A retryable failure (deadline) rewinds the partition to that record and retries after a pause; any
other failure sends the record verbatim to the dead-letter topic with ``spr-error-*`` headers and a
serialized ``spr.v1.ErrorInfo``, and the stage moves on. Records are scored one by one: a scorer
already batches all candidates of a region into its forward passes, and runs one model at a time.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message
from kafka import KafkaProducer, TopicPartition
from prometheus_client import Counter

from services.common import metrics as common_metrics
from services.common.errors import SprError
from services.common.kafka_io import (
    ConsumedRecord,
    Headers,
    KafkaSettings,
    ProtoConsumer,
    ProtoProducer,
    Topic,
    UndecodableRecord,
)
from services.scorers.settings import ScorerStageSettings
from spr.v1 import common_pb2, describer_pb2

_LOG = logging.getLogger(__name__)
CODE_UNDECODABLE = "RECORD_UNDECODABLE"
CODE_INTERNAL = "INTERNAL"

R = TypeVar("R", bound=Message)
Polled = ConsumedRecord[describer_pb2.DescriptionRecord] | UndecodableRecord
ScoreFn = Callable[[describer_pb2.DescriptionRecord, float], R]


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """A score record, or an error (retryable or not)."""

    record: Polled
    scores: R | None = None
    code: str = ""
    message: str = ""
    retry: bool = False


class ScoreStage(Generic[R]):
    """Consumes descriptions, produces score records; :meth:`run` until stopped (:meth:`step` in tests)."""

    def __init__(
        self,
        name: str,
        score: ScoreFn[R],
        output: Topic[R],
        settings: ScorerStageSettings,
        records_metric: Counter,
        kafka: KafkaSettings | None = None,
    ) -> None:
        self.name, self.score, self.output, self.settings = name, score, output, settings
        self.records_metric = records_metric
        kafka = kafka or settings.kafka(f"spr-{name}")
        descriptions = Topic(settings.descriptions_topic, describer_pb2.DescriptionRecord)
        group = settings.group_id or f"spr-{name}"
        self.consumer: ProtoConsumer[describer_pb2.DescriptionRecord] = ProtoConsumer(
            kafka, group, [descriptions]
        )
        self.producer = ProtoProducer(kafka)
        # Dead letters keep the original bytes and headers, which ProtoProducer (typed) cannot send.
        self.dead_letters = KafkaProducer(**kafka.producer_kwargs())

    def run(self, stop: threading.Event) -> None:
        """Process records until ``stop`` is set."""
        while not stop.is_set():
            if self.step() and not stop.is_set():
                stop.wait(self.settings.retry_backoff_s)

    def step(self, timeout_ms: int = 1000) -> bool:
        """Poll one batch, score, produce, commit. True when some record must be retried."""
        records = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.settings.batch_size)
        if not records:
            return False
        handled: list[Polled] = []
        rewind: dict[tuple[str, int], int] = {}
        for record in records:  # each partition's records come in offset order
            partition = (record.topic, record.partition)
            if partition in rewind:
                continue
            outcome = self._process(record)
            if outcome.retry:
                _LOG.warning("will retry %s/%d@%d: %s", *partition, record.offset, outcome.message)
                rewind[partition] = record.offset
                self._count(outcome, "retried")
                continue
            self._publish(outcome)
            handled.append(record)
        self.producer.flush()
        self.dead_letters.flush()
        if handled:
            self.consumer.commit(handled)
        for (topic, number), offset in rewind.items():
            self.consumer.raw.seek(TopicPartition(topic, number), offset)
        return bool(rewind)

    def close(self) -> None:
        """Leave the group and close the producers."""
        self.consumer.close()
        self.producer.close()
        self.dead_letters.close()

    def _process(self, record: Polled) -> Outcome[R]:
        if isinstance(record, UndecodableRecord):
            return Outcome(record, code=CODE_UNDECODABLE, message=record.reason)
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            return Outcome(record, scores=self.score(record.message, deadline))
        except SprError as error:
            return Outcome(record, code=error.code, message=error.message, retry=error.retryable)
        except Exception as exc:  # a bug must not stop the stream: dead-letter the record, log the trace
            _LOG.exception("unexpected error scoring %s/%d@%d", record.topic, record.partition, record.offset)
            return Outcome(record, code=CODE_INTERNAL, message=f"{type(exc).__name__}: {exc}")

    def _publish(self, outcome: Outcome[R]) -> None:
        record = outcome.record
        if outcome.scores is not None and isinstance(record, ConsumedRecord):
            self.producer.send(self.output, record.message.region.region_id or record.key, outcome.scores)
            self._count(outcome, "produced")
            return
        _LOG.warning(
            "dead-lettering %s/%d@%d: %s %s",
            record.topic,
            record.partition,
            record.offset,
            outcome.code,
            outcome.message,
        )
        info = common_pb2.ErrorInfo(
            stage=self.name,
            code=outcome.code,
            message=outcome.message,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
        )
        headers: Headers = [
            *record.headers,
            ("spr-error-code", outcome.code.encode()),
            ("spr-error-message", outcome.message.encode("utf-8", "replace")),
            ("spr-error-stage", self.name.encode()),
            ("spr-error-info", info.SerializeToString()),
        ]
        if isinstance(record, UndecodableRecord):
            key, value = record.key, record.value
        else:
            key, value = record.key.encode("utf-8"), record.message.SerializeToString()
        self.dead_letters.send(self.settings.dead_letters(), key=key, value=value, headers=headers)
        self._count(outcome, "dead_lettered")

    def _count(self, outcome: Outcome[R], result: str) -> None:
        self.records_metric.labels(result).inc()
        if outcome.code:
            common_metrics.ERRORS.labels(f"{self.name}_stage", outcome.code).inc()


def run_stage(stage: ScoreStage[R], metrics_port: int, metrics_host: str, enabled: bool) -> None:
    """Serve metrics, run ``stage`` until SIGTERM/SIGINT, then close it."""
    if enabled:
        common_metrics.start_metrics_server(metrics_port, metrics_host)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    _LOG.info("%s stage: %s -> %s", stage.name, stage.settings.descriptions_topic, stage.output.name)
    try:
        stage.run(stop)
    finally:
        stage.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stage_metrics_port(server_metrics_port: int, settings: ScorerStageSettings) -> int:
    """The stage's metrics port: its own setting, else the server's + 1 (both may run on one host)."""
    return settings.metrics_port or (server_metrics_port + 1 if server_metrics_port else 0)


__all__: Sequence[str] = ("ScoreStage", "run_stage", "stage_metrics_port")
