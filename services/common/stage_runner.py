"""The one Kafka stage runner behind every record-at-a-time stage (describer, scorers): SPEC §3.

A stage is a consumer-group member that turns each record of an input topic into one record of an
output topic. What a stage does with ONE record is a plain function (:class:`StageSpec.handle`,
KServe style: ``handle(message, deadline) -> output``); everything about transport lives here:

* **Batching.** Polled records gather into a batch of at most ``batch_size`` records, or whatever
  arrived within ``batch_max_wait_s`` of the first one; a batch runs on a worker pool of
  ``concurrency`` threads (one thread per record, so Triton can batch concurrent requests).
* **Bounded in-flight work, pause/resume.** At most ``max_in_flight`` records are polled and not yet
  handed back. At that bound every assigned partition is *paused* and the main thread keeps calling
  ``poll()``: it fetches nothing but stays a live member, so a slow model never exceeds
  ``max.poll.interval.ms`` and never gets the member evicted from its group.
* **Commit after acknowledgement.** Finished batches are published in the order they were submitted
  (so each partition's outputs keep its offset order); a partition's offset is committed only once
  every output and dead letter up to it was acknowledged by the broker (``acks=all``).
* **Failures.** A retryable :class:`~services.common.errors.SprError` (Triton down, deadline) rewinds
  its partition to that record, which is retried after an exponential backoff (``retry_backoff_s``
  doubling up to ``retry_backoff_max_s``) while the partition is paused; the stream is delayed, not
  dead-lettered. Anything else (a non-retryable SprError, an undecodable record, an unexpected
  exception) sends the original record, bytes and headers, to the dead-letter topic with
  ``spr-error-code``, ``spr-error-message``, ``spr-error-stage`` and ``spr-error-info`` (a serialized
  ``spr.v1.ErrorInfo``) headers, and the stage moves on; a stage with ``on_failure`` (the scorers) also
  produces that function's output for the record, so a join downstream learns of the failure at once.
  A failed *produce* (the broker refused it
  past the producer's own retries) rewinds every partition involved to its first unacknowledged
  record: at-least-once, duplicates are dropped downstream by record ids. A send not acknowledged
  within ``ack_timeout_s`` counts as failed; either way the producers are replaced first, since an
  idempotent producer can hold its batches for ever once a restarted broker lost its sequence state.
* **Graceful drain.** When ``stop`` is set (SIGTERM/SIGINT in :func:`serve_stage`) the runner polls
  nothing new, finishes the batches in flight, publishes them, waits for the acknowledgements,
  commits, and leaves the group. A rebalance drops the work of the revoked partitions (see
  :meth:`StageRunner.on_partitions_revoked`); their new owner redoes it from the last commit.

Metrics (label ``stage``): records by outcome (consumed, produced, dead_lettered, retried),
processing latency per record, batch size, records in flight, consumer lag per partition
(end offset - position, refreshed every ``lag_interval_s``) and throughput.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from kafka import ConsumerRebalanceListener, KafkaProducer, TopicPartition
from pydantic import BaseModel, ConfigDict, Field

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
    close_producer,
)
from spr.v1 import common_pb2

_LOG = logging.getLogger(__name__)

#: Codes of dead-lettered records that are not SprErrors.
CODE_UNDECODABLE = "RECORD_UNDECODABLE"
CODE_INTERNAL = "INTERNAL"

#: Dead-letter headers added to the original record's own headers.
HEADER_ERROR_CODE = "spr-error-code"
HEADER_ERROR_MESSAGE = "spr-error-message"
HEADER_ERROR_STAGE = "spr-error-stage"
HEADER_ERROR_INFO = "spr-error-info"

In = TypeVar("In", bound=Message)
Out = TypeVar("Out", bound=Message)
Polled = ConsumedRecord[Any] | UndecodableRecord

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

RECORDS = common_metrics.counter(
    "spr_stage_records",
    "Records handled by a Kafka stage, by outcome (consumed, produced, dead_lettered, retried).",
    ("stage", "outcome"),
)
PROCESSING_SECONDS = common_metrics.histogram(
    "spr_stage_processing_seconds", "Time the stage's handler took for one record.", ("stage",)
)
PRODUCER_RECOVERIES = common_metrics.counter(
    "spr_stage_producer_recoveries",
    "Times a stage replaced its producers and re-read its unacknowledged records (a send failed or "
    "was not acknowledged within ack_timeout_s).",
    ("stage",),
)
BATCH_RECORDS = common_metrics.histogram(
    "spr_stage_batch_records", "Records per batch handed to the workers.", ("stage",), _BATCH_BUCKETS
)
IN_FLIGHT = common_metrics.gauge(
    "spr_stage_in_flight_records", "Records polled and not yet published or dropped.", ("stage",)
)
CONSUMER_LAG = common_metrics.gauge(
    "spr_stage_consumer_lag_records",
    "End offset minus the member's position, per assigned input partition.",
    ("stage", "topic", "partition"),
)
THROUGHPUT = common_metrics.gauge(
    "spr_stage_throughput_records_per_second",
    "Records published (outputs and dead letters) per second over the last lag interval.",
    ("stage",),
)


class RunnerSettings(BaseModel):
    """Transport settings of a stage; each stage's settings extend this (same env names everywhere)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated."
    )
    api_version: str | None = Field(
        default=None, description="Pin the Kafka protocol version, e.g. '2.0.0'; unset = negotiate."
    )
    session_timeout_ms: int = Field(default=45_000, ge=1000, description="Consumer group session timeout.")
    heartbeat_interval_ms: int = Field(default=3_000, ge=100, description="Consumer heartbeat interval.")
    max_poll_interval_ms: int = Field(
        default=300_000, ge=1000, description="Longest gap between two polls before eviction."
    )
    batch_size: int = Field(default=8, ge=1, description="Most records in one batch.")
    batch_max_wait_s: float = Field(
        default=0.05, ge=0, description="Longest wait for a batch to fill after its first record."
    )
    concurrency: int = Field(default=1, ge=1, description="Records handled at once (worker threads).")
    max_in_flight: int = Field(
        default=0, ge=0, description="Records polled but not yet published; 0 = 2 x batch_size."
    )
    retry_backoff_s: float = Field(
        default=2.0, ge=0, description="Pause before the first retry of a record whose failure is retryable."
    )
    retry_backoff_max_s: float = Field(
        default=60.0, ge=0, description="Cap of the exponential backoff between retries of one record."
    )
    request_timeout_s: float = Field(default=120.0, gt=0, description="Deadline of one record's handling.")
    ack_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Longest wait for the broker to acknowledge a published batch; past it the producers "
        "are replaced and the batch's partitions read again (an idempotent producer can hold its batches "
        "for ever after a broker restart lost its sequence state).",
    )
    drain_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest wait for in-flight work on shutdown."
    )
    lag_interval_s: float = Field(
        default=5.0, gt=0, description="How often consumer lag and throughput are refreshed."
    )

    def kafka(self, client_id: str) -> KafkaSettings:
        """The shared Kafka client settings of this stage."""
        version = tuple(int(p) for p in self.api_version.split(".")) if self.api_version else None
        return KafkaSettings(
            bootstrap_servers=self.bootstrap_servers,
            client_id=client_id,
            api_version=version,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            max_poll_interval_ms=self.max_poll_interval_ms,
        )

    def in_flight_limit(self) -> int:
        """The effective ``max_in_flight`` (never below one batch)."""
        return max(self.max_in_flight or 2 * self.batch_size, self.batch_size)

    def backoff_s(self, attempt: int) -> float:
        """Wait before retry number ``attempt`` (1 = the first retry) of one record."""
        return float(min(self.retry_backoff_max_s, self.retry_backoff_s * 2 ** (attempt - 1)))


Handler = Callable[[In, float], Out]
KeyOf = Callable[[ConsumedRecord[In], Out], str]
FailureOutput = Callable[[In, common_pb2.ErrorInfo], Out]


def record_key(record: ConsumedRecord[Any], output: Message) -> str:
    """The default output key: the input record's key (the region id on every stream topic)."""
    return record.key


@dataclass(frozen=True)
class StageSpec(Generic[In, Out]):
    """What a stage is: its name, topics, group and what it does with one record.

    ``handle(message, deadline)`` (``deadline`` on ``time.monotonic()``) returns the output message
    or raises; an :class:`SprError` says whether retrying can help. ``key`` names the output's key.
    ``on_failure(message, error)``, when given, is the output that tells downstream a decodable record
    failed for good; it is produced besides the record's dead letter, so that a consumer joining this
    output never waits for a record that will not come.
    """

    name: str
    input: Topic[In]
    output: Topic[Out]
    dead_letter_topic: str
    group_id: str
    handle: Handler[In, Out]
    key: KeyOf[In, Out] = record_key
    on_failure: FailureOutput[In, Out] | None = None


@dataclass(frozen=True)
class Outcome:
    """What handling one record gave: an output, or an error (retryable or not)."""

    output: Message | None = None
    code: str = ""
    message: str = ""
    retry: bool = False


@dataclass(frozen=True)
class _Tracked:
    """A polled record with the rewind generation of its partition when it was polled."""

    record: Polled
    partition: TopicPartition
    generation: int


@dataclass
class _Batch:
    records: list[_Tracked]
    outcomes: list[Future[Outcome]]

    def done(self) -> bool:
        return all(future.done() for future in self.outcomes)


@dataclass
class _Published:
    """Sends of one published batch; its partitions are committed once every send is acknowledged."""

    last: dict[TopicPartition, Polled] = field(default_factory=dict)
    first_offset: dict[TopicPartition, int] = field(default_factory=dict)
    sends: list[Any] = field(default_factory=list)
    sent_at: float = field(default_factory=time.monotonic)

    def add(self, tracked: _Tracked, sends: Sequence[Any]) -> None:
        self.last[tracked.partition] = tracked.record
        self.first_offset.setdefault(tracked.partition, tracked.record.offset)
        self.sends.extend(sends)

    def acknowledged(self) -> bool:
        return all(send.is_done for send in self.sends)

    def failure(self) -> BaseException | None:
        return next((send.exception for send in self.sends if send.failed()), None)


@dataclass
class _Retry:
    offset: int
    attempts: int
    until: float


class StageRunner(Generic[In, Out], ConsumerRebalanceListener):  # type: ignore[misc]
    """Runs one :class:`StageSpec`: :meth:`run` until stopped (or :meth:`step`), then :meth:`close`."""

    def __init__(self, spec: StageSpec[In, Out], settings: RunnerSettings, kafka: KafkaSettings) -> None:
        self.spec, self.settings = spec, settings
        self.consumer: ProtoConsumer[In] = ProtoConsumer(kafka, spec.group_id, [spec.input])
        # Subscribe again with this runner as the listener (before the first poll, so before any join):
        # a rebalance then forgets the work of the partitions it takes away.
        self.consumer.raw.unsubscribe()
        self.consumer.raw.subscribe([spec.input.name], listener=self)
        self.kafka_settings = kafka
        self.producer = ProtoProducer(kafka)
        # Dead letters keep the original bytes and headers, which ProtoProducer (typed) cannot send.
        self.dead_letters = KafkaProducer(**kafka.producer_kwargs())
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix=f"{spec.name}-stage")
        self._limit = settings.in_flight_limit()
        self._pending: list[_Tracked] = []
        self._pending_since = 0.0
        self._in_flight: deque[_Batch] = deque()
        self._unacked: deque[_Published] = deque()
        self._generation: dict[TopicPartition, int] = {}
        self._retries: dict[TopicPartition, _Retry] = {}
        self._stopping = False
        self._next_stats = time.monotonic() + settings.lag_interval_s
        self._published_since_stats = 0
        self._metric = _StageMetrics(spec.name)

    # --- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Process records until ``stop`` is set, then drain (finish, publish, commit)."""
        while not stop.is_set():
            self.step()
        self.drain()

    def step(self, timeout_ms: int = 100) -> None:
        """One turn: poll (or just heartbeat when paused), hand out a batch, publish, commit."""
        self._update_pauses()
        self._submit_due_batch()  # first, so that a full batch never waits in poll()
        self._poll(timeout_ms)
        self._submit_due_batch()
        self._publish_finished()
        self._commit_acknowledged()
        self._refresh_stats()

    def drain(self, timeout_s: float | None = None) -> None:
        """Stop taking records; finish, publish and commit what is in flight (bounded wait)."""
        self._stopping = True
        self._drop_pending(lambda tracked: True)
        deadline = time.monotonic() + (timeout_s or self.settings.drain_timeout_s)
        while (self._in_flight or self._unacked) and time.monotonic() < deadline:
            self._update_pauses()
            self._poll(50)  # stay a live member while the last batches finish
            self._publish_finished()
            self._commit_acknowledged()
        if self._in_flight or self._unacked:
            _LOG.warning("%s stage: drain timed out; uncommitted records will be redelivered", self.spec.name)

    def close(self) -> None:
        """Leave the group (uncommitted records go to other members) and close the producers."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.consumer.close()
        self.producer.close()
        self.dead_letters.close()
        self._metric.in_flight.set(0)

    @property
    def in_flight(self) -> int:
        """Records polled and not yet published or dropped."""
        return len(self._pending) + sum(len(batch.records) for batch in self._in_flight)

    # --- rebalance (called inside poll(), on this thread) ----------------------------------------

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Forget the work of the partitions being taken away; their new owner redoes it.

        Only bookkeeping: kafka-python calls listeners on its network thread, where no blocking
        client call (a commit) is allowed, and waiting there for a slow model would stall the
        heartbeats. Results of revoked partitions still in flight are dropped when they finish, and
        their uncommitted outputs are produced again by the new owner (at-least-once; downstream
        drops duplicates by record ids). A planned stop drains first (:meth:`drain`), so nothing is
        left to forget when :meth:`close` leaves the group.
        """
        gone = set(revoked)
        if not gone:
            return
        for partition in gone:
            self._generation[partition] = self._generation.get(partition, 0) + 1
            self._retries.pop(partition, None)
            self._metric.forget_partition(partition)
        self._drop_pending(lambda tracked: tracked.partition in gone)
        for published in self._unacked:
            for partition in gone:
                published.last.pop(partition, None)

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """Nothing to set up: positions come from the committed offsets."""
        _LOG.info("%s stage: assigned %s", self.spec.name, sorted(str(tp) for tp in assigned))

    # --- polling and pausing ---------------------------------------------------------------------

    def _update_pauses(self) -> None:
        raw = self.consumer.raw
        assigned = raw.assignment()
        now = time.monotonic()
        full = self._stopping or self.in_flight >= self._limit
        wanted = set(assigned) if full else {tp for tp, r in self._retries.items() if r.until > now}
        wanted &= set(assigned)
        paused = raw.paused()
        if wanted - paused:
            raw.pause(*(wanted - paused))
        if paused - wanted:
            raw.resume(*(paused - wanted))

    def _poll(self, timeout_ms: int) -> None:
        room = max(min(self.settings.batch_size - len(self._pending), self._limit - self.in_flight), 1)
        if self._pending:  # do not sit in poll() past the batch's deadline
            left = self._pending_since + self.settings.batch_max_wait_s - time.monotonic()
            timeout_ms = max(min(timeout_ms, int(left * 1000)), 0)
        records = self.consumer.poll(timeout_ms=timeout_ms, max_records=room)
        if records and not self._pending:
            self._pending_since = time.monotonic()
        for record in records:
            partition = TopicPartition(record.topic, record.partition)
            self._pending.append(_Tracked(record, partition, self._generation.get(partition, 0)))
        self._metric.records("consumed", len(records))
        self._metric.in_flight.set(self.in_flight)

    def _drop_pending(self, which: Callable[[_Tracked], bool]) -> None:
        self._pending = [tracked for tracked in self._pending if not which(tracked)]
        self._metric.in_flight.set(self.in_flight)

    # --- processing ------------------------------------------------------------------------------

    def _submit_due_batch(self) -> None:
        if not self._pending:
            return
        full = len(self._pending) >= self.settings.batch_size
        waited = time.monotonic() - self._pending_since >= self.settings.batch_max_wait_s
        if not (full or waited or self._stopping):
            return
        batch, self._pending = self._pending, []
        self._metric.batch.observe(len(batch))
        self._in_flight.append(_Batch(batch, [self._pool.submit(self._handle, t.record) for t in batch]))

    def _handle(self, record: Polled) -> Outcome:
        """Run the stage's handler on one record (worker thread); never raises."""
        if isinstance(record, UndecodableRecord):
            return Outcome(code=CODE_UNDECODABLE, message=record.reason)
        started = time.monotonic()
        try:
            return Outcome(output=self.spec.handle(record.message, started + self.settings.request_timeout_s))
        except SprError as error:
            return Outcome(code=error.code, message=error.message, retry=error.retryable)
        except Exception as exc:  # a bug must not stop the stream: dead-letter the record, log the trace
            _LOG.exception(
                "%s stage: unexpected error on %s/%d@%d",
                self.spec.name,
                record.topic,
                record.partition,
                record.offset,
            )
            return Outcome(code=CODE_INTERNAL, message=f"{type(exc).__name__}: {exc}")
        finally:
            self._metric.processing.observe(time.monotonic() - started)

    # --- publishing ------------------------------------------------------------------------------

    def _publish_finished(self) -> None:
        """Publish finished batches in submission order, so each partition keeps its offset order."""
        while self._in_flight and self._in_flight[0].done():
            batch = self._in_flight.popleft()
            published = _Published()
            for tracked, future in zip(batch.records, batch.outcomes, strict=True):
                if tracked.generation != self._generation.get(tracked.partition, 0):
                    continue  # its partition was rewound: the record comes back from the broker
                outcome = future.result()
                if outcome.retry:
                    self._rewind_for_retry(tracked, outcome)
                    continue
                published.add(tracked, self._send(tracked, outcome))
                self._clear_retry(tracked)
            if published.last:
                self._unacked.append(published)
            self._metric.in_flight.set(self.in_flight)

    def _send(self, tracked: _Tracked, outcome: Outcome) -> list[Any]:
        """The sends of one finished record: its output, or its dead letter (and failure output)."""
        record = tracked.record
        self._published_since_stats += 1
        if outcome.output is not None and isinstance(record, ConsumedRecord):
            self._metric.records("produced")
            key = self.spec.key(record, outcome.output)  # type: ignore[arg-type]
            output: Out = outcome.output  # type: ignore[assignment]  # the handler's return value
            return [self.producer.send(self.spec.output, key, output)]
        self._metric.records("dead_lettered")
        common_metrics.ERRORS.labels(f"{self.spec.name}_stage", outcome.code).inc()
        _LOG.warning(
            "%s stage: dead-lettering %s/%d@%d: %s %s",
            self.spec.name,
            record.topic,
            record.partition,
            record.offset,
            outcome.code,
            outcome.message,
        )
        info = error_info(self.spec.name, record, outcome.code, outcome.message)
        sends = [
            self.dead_letters.send(
                self.spec.dead_letter_topic,
                key=_key_bytes(record),
                value=_value_bytes(record),
                headers=dead_letter_headers(record, info),
            )
        ]
        if self.spec.on_failure is not None and isinstance(record, ConsumedRecord):
            failure = self.spec.on_failure(record.message, info)
            sends.append(self.producer.send(self.spec.output, self.spec.key(record, failure), failure))
        return sends

    def _rewind_for_retry(self, tracked: _Tracked, outcome: Outcome) -> None:
        offset = tracked.record.offset
        previous = self._retries.get(tracked.partition)
        attempts = previous.attempts + 1 if previous is not None and previous.offset == offset else 1
        wait = self.settings.backoff_s(attempts)
        self._retries[tracked.partition] = _Retry(offset, attempts, time.monotonic() + wait)
        self._rewind(tracked.partition, offset)
        self._metric.records("retried")
        common_metrics.ERRORS.labels(f"{self.spec.name}_stage", outcome.code).inc()
        _LOG.warning(
            "%s stage: retry %d of %s@%d in %.1f s: %s %s",
            self.spec.name,
            attempts,
            tracked.partition,
            offset,
            wait,
            outcome.code,
            outcome.message,
        )

    def _clear_retry(self, tracked: _Tracked) -> None:
        retry = self._retries.get(tracked.partition)
        if retry is not None and tracked.record.offset >= retry.offset:
            del self._retries[tracked.partition]

    def _rewind(self, partition: TopicPartition, offset: int) -> None:
        """Read ``partition`` again from ``offset``; work polled after it is dropped when it finishes."""
        self._generation[partition] = self._generation.get(partition, 0) + 1
        self._drop_pending(lambda tracked: tracked.partition == partition)
        if partition in self.consumer.raw.assignment():
            self.consumer.raw.seek(partition, offset)

    # --- committing ------------------------------------------------------------------------------

    def _commit_acknowledged(self) -> None:
        ready: list[_Published] = []
        while self._unacked:
            published = self._unacked[0]
            if not published.acknowledged():
                waited = time.monotonic() - published.sent_at
                if waited > self.settings.ack_timeout_s:
                    self._rewind_unacknowledged(TimeoutError(f"no acknowledgement after {waited:.0f}s"))
                break
            failure = published.failure()
            if failure is not None:
                self._rewind_unacknowledged(failure)
                break
            ready.append(self._unacked.popleft())
        if ready:
            self.consumer.commit([record for published in ready for record in published.last.values()])

    def _rewind_unacknowledged(self, failure: BaseException) -> None:
        """A send failed or hangs: new producers, and every partition read again from its first record
        not acknowledged.

        New producers because an idempotent producer whose batch failed (OutOfOrderSequenceNumber after a
        broker lost its producer state) can hold every later batch for ever; what the old ones still hold
        is abandoned, and re-sent from the re-read records (at-least-once, duplicates dropped downstream).
        """
        PRODUCER_RECOVERIES.labels(self.spec.name).inc()
        self.producer.close(0)
        close_producer(self.dead_letters, 0)
        self.producer = ProtoProducer(self.kafka_settings)
        self.dead_letters = KafkaProducer(**self.kafka_settings.producer_kwargs())
        first: dict[TopicPartition, int] = {}
        for later in self._unacked:
            for partition, offset in later.first_offset.items():
                first[partition] = min(first.get(partition, offset), offset)
        self._unacked.clear()
        _LOG.error("%s stage: producing failed (%s); rewinding %s", self.spec.name, failure, first)
        for partition, offset in first.items():
            self._rewind(partition, offset)

    # --- metrics ---------------------------------------------------------------------------------

    def _refresh_stats(self) -> None:
        now = time.monotonic()
        if now < self._next_stats:
            return
        elapsed = now - self._next_stats + self.settings.lag_interval_s
        self._metric.throughput.set(self._published_since_stats / elapsed)
        self._published_since_stats = 0
        self._next_stats = now + self.settings.lag_interval_s
        raw = self.consumer.raw
        assigned = list(raw.assignment())
        if not assigned:
            return
        try:
            ends = raw.end_offsets(assigned)
            for partition in assigned:
                # The fetch high watermark too: Tansu 0.6 lists too low an end for multi-record batches.
                end = max(ends[partition], raw.highwater(partition) or 0)
                self._metric.lag(partition).set(max(end - raw.position(partition), 0))
        except Exception as exc:  # metrics must never stop the stage
            _LOG.warning("%s stage: consumer lag not refreshed: %s", self.spec.name, exc)


class _StageMetrics:
    """The runner's metrics with the stage label bound once."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.processing = PROCESSING_SECONDS.labels(stage)
        self.batch = BATCH_RECORDS.labels(stage)
        self.in_flight = IN_FLIGHT.labels(stage)
        self.throughput = THROUGHPUT.labels(stage)

    def records(self, outcome: str, count: int = 1) -> None:
        if count:
            RECORDS.labels(self.stage, outcome).inc(count)

    def lag(self, partition: TopicPartition) -> Any:
        return CONSUMER_LAG.labels(self.stage, partition.topic, str(partition.partition))

    def forget_partition(self, partition: TopicPartition) -> None:
        with contextlib.suppress(KeyError):  # never measured
            CONSUMER_LAG.remove(self.stage, partition.topic, str(partition.partition))


def error_info(stage: str, record: Polled, code: str, message: str) -> common_pb2.ErrorInfo:
    """What went wrong with ``record`` in ``stage``, and where the record came from."""
    return common_pb2.ErrorInfo(
        stage=stage,
        code=code,
        message=message,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
    )


def dead_letter_headers(record: Polled, info: common_pb2.ErrorInfo) -> Headers:
    """The record's own headers plus the ``spr-error-*`` ones (``spr-error-info``: the ErrorInfo)."""
    return [
        *record.headers,
        (HEADER_ERROR_CODE, info.code.encode()),
        (HEADER_ERROR_MESSAGE, info.message.encode("utf-8", "replace")),
        (HEADER_ERROR_STAGE, info.stage.encode()),
        (HEADER_ERROR_INFO, info.SerializeToString()),
    ]


def _key_bytes(record: Polled) -> bytes | None:
    return record.key if isinstance(record, UndecodableRecord) else record.key.encode("utf-8")


def _value_bytes(record: Polled) -> bytes | None:
    return record.value if isinstance(record, UndecodableRecord) else record.message.SerializeToString()


# --- process entry ----------------------------------------------------------------------------------


def serve_stage(runner: StageRunner[Any, Any], metrics_port: int, metrics_host: str, enabled: bool) -> None:
    """Serve metrics, run ``runner`` until SIGTERM/SIGINT, drain, then close it (main thread only)."""
    if enabled:
        common_metrics.start_metrics_server(metrics_port, metrics_host)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    spec = runner.spec
    _LOG.info("%s stage: %s -> %s (group %s)", spec.name, spec.input.name, spec.output.name, spec.group_id)
    try:
        runner.run(stop)
    finally:
        runner.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


__all__: Sequence[str] = (
    "RunnerSettings",
    "StageRunner",
    "StageSpec",
    "dead_letter_headers",
    "record_key",
    "serve_stage",
)
