"""The describer's Kafka stage: ``regions`` -> ``descriptions`` (SPEC §3, stream topology).

One consumer-group member (``stage.group_id``) reads ``common_pb2.Region`` records, describes each
region (:meth:`Describer.describe_region_record`) and produces one ``DescriptionRecord`` keyed by the
region id. Offsets are committed only after the produced records were acknowledged (at-least-once;
candidate ids are stable, so downstream drops duplicates).

Failures, per record:

* retryable (Triton unavailable, deadline): the partition is rewound to that record and retried after
  ``stage.retry_backoff_s``, so an outage delays the stream instead of dead-lettering it;
* anything else (bad image, region out of bounds, undecodable record, unexpected exception): the
  record goes verbatim to ``stage.dead_letter_topic`` with its original headers plus
  ``spr-error-code``, ``spr-error-message``, ``spr-error-stage`` and ``spr-error-info`` (a serialized
  ``spr.v1.ErrorInfo``), and the stage moves on.

A fuller shared stage runner will replace this loop; it stays deliberately short.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kafka import KafkaProducer, TopicPartition

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
from services.common.settings import load_settings
from services.describer import metrics
from services.describer.logic import Describer
from services.describer.settings import DescriberSettings, StageSettings
from spr.v1 import common_pb2, describer_pb2

_LOG = logging.getLogger(__name__)

STAGE_NAME = "describer"
#: Component label of the stage's errors in ``spr_errors_total``.
ERROR_COMPONENT = "describer_stage"
#: Codes of dead-lettered records that are not SprErrors.
CODE_UNDECODABLE = "RECORD_UNDECODABLE"
CODE_INTERNAL = "INTERNAL"

Polled = ConsumedRecord[common_pb2.Region] | UndecodableRecord


@dataclass(frozen=True)
class Outcome:
    """What processing one record gave: a description, or an error (retryable or not)."""

    record: Polled
    description: describer_pb2.DescriptionRecord | None = None
    code: str = ""
    message: str = ""
    retry: bool = False


class DescriberStage:
    """Consumes regions, produces descriptions; call :meth:`run` (or :meth:`step` in tests)."""

    def __init__(
        self, describer: Describer, settings: StageSettings, kafka: KafkaSettings | None = None
    ) -> None:
        self.describer = describer
        self.settings = settings
        kafka = kafka or settings.kafka()
        self.regions = Topic(settings.regions_topic, common_pb2.Region)
        self.descriptions = Topic(settings.descriptions_topic, describer_pb2.DescriptionRecord)
        self.consumer: ProtoConsumer[common_pb2.Region] = ProtoConsumer(
            kafka, settings.group_id, [self.regions]
        )
        self.producer = ProtoProducer(kafka)
        # Dead letters keep the original bytes and headers, which ProtoProducer (typed) cannot send.
        self.dead_letters = KafkaProducer(**kafka.producer_kwargs())
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="describer-stage")

    def run(self, stop: threading.Event) -> None:
        """Process records until ``stop`` is set."""
        while not stop.is_set():
            if self.step() and not stop.is_set():
                stop.wait(self.settings.retry_backoff_s)

    def step(self, timeout_ms: int = 1000) -> bool:
        """Poll one batch, process it, produce, commit. True when some record must be retried."""
        records = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.settings.batch_size)
        if not records:
            return False
        outcomes = list(self._pool.map(self._process, records))
        handled, rewind = self._publish(outcomes)
        self.producer.flush()
        self.dead_letters.flush()
        if handled:
            self.consumer.commit(handled)
        for (topic, partition), offset in rewind.items():
            self.consumer.raw.seek(TopicPartition(topic, partition), offset)
        return bool(rewind)

    def close(self) -> None:
        """Leave the group (uncommitted records go to other members) and close the producers."""
        self._pool.shutdown(wait=True)
        self.consumer.close()
        self.producer.close()
        self.dead_letters.close()

    # --- one record -----------------------------------------------------------------------------

    def _process(self, record: Polled) -> Outcome:
        if isinstance(record, UndecodableRecord):
            return Outcome(record, code=CODE_UNDECODABLE, message=record.reason)
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            description = self.describer.describe_region_record(record.message, deadline=deadline)
        except SprError as error:
            return Outcome(record, code=error.code, message=error.message, retry=error.retryable)
        except Exception as exc:  # a bug must not stop the stream: dead-letter the record, log the trace
            _LOG.exception(
                "unexpected error describing %s/%d@%d", record.topic, record.partition, record.offset
            )
            return Outcome(record, code=CODE_INTERNAL, message=f"{type(exc).__name__}: {exc}")
        return Outcome(record, description=description)

    def _publish(self, outcomes: Sequence[Outcome]) -> tuple[list[Polled], dict[tuple[str, int], int]]:
        """Produce in offset order; stop a partition at its first retryable failure (rewound there)."""
        handled: list[Polled] = []
        rewind: dict[tuple[str, int], int] = {}
        for outcome in outcomes:  # poll() returns each partition's records in offset order
            record = outcome.record
            partition = (record.topic, record.partition)
            if partition in rewind:
                continue
            if outcome.retry:
                _LOG.warning(
                    "will retry %s/%d@%d: %s %s", *partition, record.offset, outcome.code, outcome.message
                )
                rewind[partition] = record.offset
                self._count(outcome, "retried")
                continue
            if outcome.description is not None:
                key = outcome.description.region.region_id or _key(record)
                self.producer.send(self.descriptions, key, outcome.description)
                self._count(outcome, "produced")
            else:
                self._dead_letter(outcome)
                self._count(outcome, "dead_lettered")
            handled.append(record)
        return handled, rewind

    def _dead_letter(self, outcome: Outcome) -> None:
        record = outcome.record
        _LOG.warning(
            "dead-lettering %s/%d@%d: %s %s",
            record.topic,
            record.partition,
            record.offset,
            outcome.code,
            outcome.message,
        )
        info = common_pb2.ErrorInfo(
            stage=STAGE_NAME,
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
            ("spr-error-stage", STAGE_NAME.encode()),
            ("spr-error-info", info.SerializeToString()),
        ]
        self.dead_letters.send(
            self.settings.dead_letter_topic, key=_key_bytes(record), value=_value(record), headers=headers
        )

    @staticmethod
    def _count(outcome: Outcome, result: str) -> None:
        metrics.STAGE_RECORDS.labels(result).inc()
        if outcome.code:
            common_metrics.ERRORS.labels(ERROR_COMPONENT, outcome.code).inc()


def _key(record: Polled) -> str:
    if isinstance(record, ConsumedRecord):
        return record.key
    return (record.key or b"").decode("utf-8", "replace")


def _key_bytes(record: Polled) -> bytes | None:
    return record.key if isinstance(record, UndecodableRecord) else record.key.encode("utf-8")


def _value(record: Polled) -> bytes | None:
    return record.value if isinstance(record, UndecodableRecord) else record.message.SerializeToString()


# --- entry point ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m services.describer.stage`` (``spr-describer-stage``): run until SIGTERM/SIGINT."""
    settings = load_settings(DescriberSettings, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.metrics_enabled:
        common_metrics.start_metrics_server(settings.stage.metrics_port, settings.metrics_host)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    describer = Describer(settings)
    stage = DescriberStage(describer, settings.stage)
    _LOG.info(
        "describer stage: %s -> %s (group %s)",
        settings.stage.regions_topic,
        settings.stage.descriptions_topic,
        settings.stage.group_id,
    )
    try:
        stage.run(stop)
    finally:
        stage.close()
        describer.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    main()
