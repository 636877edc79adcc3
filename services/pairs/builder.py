"""The pair builder: joins ``descriptions`` with ``scores.localization`` and ``scores.semantic`` per region
and produces exactly one ``PairDecision`` per region to ``pairs`` (SPEC §3, stream topology).

**Partitioning.** Every stream topic is keyed by region id with one partition count, so all records of
a region sit on the same partition number p of each input topic. The consumer uses the range assignor,
which hands partition p of every subscribed topic to the same member: the join is local, and the
decision (keyed by region id) is sent to partition p of ``pairs``.

**Join.** :class:`~services.pairs.join.JoinState` buffers a region's records until the description and
both score records are there (only the localization one when ``lambda_sem == 0``). The records must name
the same candidates and run id (:func:`~services.pairs.logic.run_mismatch`,
:class:`~services.pairs.logic.RecordsMismatch`), else they all go to the
dead-letter topic (code ``RECORDS_MISMATCH``) and the region gets no decision: no skip reason fits, and
the dead letters are where such a region ends. Otherwise :func:`~services.pairs.logic.decide_all` refines,
re-scores and applies the margin rule, and the decision is produced with the idempotent pair id
``pair_id(region id, run id)``. The regions one poll completes are decided together, in one batch: the
numeric work of refinement is shared, which is most of what one core can decide per second.

**Nothing lost: state rebuilt from the topics, no checkpoint.** Offsets are committed only after every
decision and dead letter sent so far is acknowledged. The offset committed on an input partition is
the offset of the oldest record there that belongs to a still-open region (or the next one to read if
none is open), so a restart re-reads every record of every open region and rebuilds the same state.

**Nothing decided twice.** Re-reading from that commit point also re-reads records of regions decided
after it. Some of those regions come back only partially (their description may sit before the commit
point on ``descriptions`` while their scores sit after it on a score topic), and would otherwise time
out as a second, different decision. So the commit also records, in each offset's metadata
(``pairs_from=<n>``), the ``pairs`` offset from which every decision made after the oldest open region
opened is found: the next ``pairs`` offset known when that region opened. When partitions are
assigned (start, rebalance, or after a failed produce) the builder reads ``pairs`` partition p from the
smallest such mark to its end and remembers those regions (of its own run id) as decided; their
re-read records are then dropped as late. A decision acknowledged by the broker but not by the client
before a crash is found this way too. Brokers that drop commit metadata (Tansu) get the last
``seed_scan_records`` decisions read instead. What remains are duplicates with identical pair ids (a crash
before the first commit, a decided-region LRU that forgot an id): the trainer keeps one pair per pair id
(``trainer.source.Batch.pairs``).

**Timeouts.** A region still incomplete ``timeout_s`` after its first record, while the partitions of
its missing inputs are caught up (consumer position at the high watermark: under lag the record may
simply not be read yet), is dead-lettered (every record it has, verbatim, code ``SCORES_TIMED_OUT``,
the missing topics in the message) AND decided as a ``SKIP_REASON_SCORES_TIMED_OUT`` skip, so every
region ends in exactly one decision. The clock is this process's: after a restart a re-read open
region waits ``timeout_s`` again. Records of a region already decided are dropped and counted (LRU of
``decided_capacity`` region ids). A scorer that cannot score a description (it dead-letters it) sends a
score record carrying the error instead of scores; the region is then decided at once as a
``SKIP_REASON_SCORING_FAILED`` skip with that error, not after ``timeout_s``. Likewise a region the
describer could not describe: its description record carries the error, both scorers pass it on, and
the region is decided as ``SKIP_REASON_DESCRIBE_FAILED``.

**Bad input.** Undecodable records (schema header, protobuf) go to the dead-letter topic with
``spr-error-*`` headers and a serialized ``spr.v1.ErrorInfo``, as in the other stages; so do regions whose
records fail validation or make ``decide`` raise. The builder never stops on a record.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaTopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import CommitFailedError, KafkaError, KafkaTimeoutError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata

from services.common import metrics as common_metrics
from services.common.kafka_io import (
    ConsumedRecord,
    Headers,
    KafkaSettings,
    ProtoConsumer,
    ProtoProducer,
    Topic,
    UndecodableRecord,
    close_producer,
    decode_record,
    ensure_topics,
)
from services.common.metrics import observe_many
from services.common.topics import (
    DESCRIPTIONS,
    PAIRS,
    SCORES_LOCALIZATION,
    SCORES_SEMANTIC,
    dead_letter_topic,
    stream_topics,
)
from services.pairs import metrics
from services.pairs.join import JoinState, Kind, OpenRegion, Status
from services.pairs.logic import (
    RecordsMismatch,
    decide_all,
    run_mismatch,
    timed_out,
    upstream_failed,
    upstream_failure,
)
from services.pairs.settings import PairBuilderSettings
from spr.v1 import common_pb2, pairs_pb2

_LOG = logging.getLogger(__name__)

STAGE_NAME = "pair-builder"
ERROR_COMPONENT = "pair_builder"
CODE_UNDECODABLE = "RECORD_UNDECODABLE"
CODE_MISMATCH = "RECORDS_MISMATCH"
CODE_INVALID = "INVALID_RECORD"
CODE_INTERNAL = "INTERNAL"
CODE_TIMED_OUT = "SCORES_TIMED_OUT"
PAIRS_FROM = "pairs_from="
SEED_TIMEOUT_S = 60.0
COMMITTED_TIMEOUT_MS = 30_000
PRODUCE_BATCH_BYTES = 512 * 1024
PRODUCE_LINGER_MS = 20

Polled = ConsumedRecord[Any] | UndecodableRecord


class PairBuilder:
    """Consumes the input topics, produces decisions; :meth:`run` until stopped (:meth:`step` in tests)."""

    def __init__(
        self,
        settings: PairBuilderSettings,
        kafka: KafkaSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.rules, self.clock = settings, settings.rules(), clock
        self.kafka = kafka or settings.kafka()
        declared = stream_topics(settings.partitions, settings.retention_ms)
        names = {
            DESCRIPTIONS: settings.descriptions_topic,
            SCORES_LOCALIZATION: settings.localization_topic,
            SCORES_SEMANTIC: settings.semantic_topic,
        }
        if not settings.needs_semantic:
            names.pop(SCORES_SEMANTIC)
        self.inputs: list[Topic[Any]] = [replace(declared[key], name=name) for key, name in names.items()]
        self.pairs: Topic[pairs_pb2.PairDecision] = replace(declared[PAIRS], name=settings.pairs_topic)
        if settings.ensure_topics:
            dead_letters = replace(dead_letter_topic(PAIRS), name=settings.dead_letter_topic)
            ensure_topics(self.kafka, [*self.inputs, self.pairs, dead_letters])
        kinds = {
            settings.descriptions_topic: Kind.DESCRIPTION,
            settings.localization_topic: Kind.LOCALIZATION,
            settings.semantic_topic: Kind.SEMANTIC,
        }
        kinds = {topic.name: kinds[topic.name] for topic in self.inputs}
        self.state = JoinState(kinds, kinds.values(), settings.decided_capacity)
        self.consumer: ProtoConsumer[Any] = ProtoConsumer(
            self.kafka,
            settings.group_id,
            self.inputs,
            partition_assignment_strategy=[RangePartitionAssignor],  # co-partitioned join (module doc)
            check_crcs=settings.check_crcs,
        )
        self._rebalances = _Rebalance()
        self.consumer.raw.subscribe([t.name for t in self.inputs], listener=self._rebalances)
        # Decisions are acknowledged in bulk before each commit, so large batches cost no latency there.
        self.producer = ProtoProducer(self.kafka, batch_size=PRODUCE_BATCH_BYTES, linger_ms=PRODUCE_LINGER_MS)
        # Dead letters keep the original headers, which ProtoProducer (typed) cannot send.
        self.dead_letters = KafkaProducer(**self.kafka.producer_kwargs())
        self._pairs_reader = KafkaConsumer(**self.kafka.common_kwargs(), enable_auto_commit=False)
        self._consumed: dict[tuple[str, int], int] = {}  # next offset to read, per input partition
        self._pairs_next: dict[int, int] = {}  # next `pairs` offset known, per partition
        self._pending: list[Any] = []  # futures of decisions and dead letters not yet acknowledged
        self._to_seed: set[int] = set()  # partitions assigned whose decided regions are not yet read
        self._last_commit = 0.0
        self._records_metric = {topic.name: metrics.RECORDS.labels(topic.name) for topic in self.inputs}
        self._observed = _Observations()  # the metrics of this step's records and decisions
        # Everything made so far (modules, clients) lives as long as the process: out of the garbage
        # collector's full passes, which otherwise rescan it a few times per poll (~8 % of a busy core).
        gc.freeze()

    # --- the loop -------------------------------------------------------------------------------

    def run(self, stop: Any) -> None:
        """Process records until ``stop`` (a ``threading.Event``) is set, then drain."""
        while not stop.is_set():
            self.step()
        self.drain()

    def step(self, timeout_ms: int | None = None) -> int:
        """Poll once, join and decide, expire overdue regions, settle (flush + commit when due)."""
        polled = self.consumer.poll(
            timeout_ms=timeout_ms or self.settings.poll_timeout_ms, max_records=self.settings.batch_size
        )
        try:
            now = self._handle(polled)
        finally:  # the metrics of what was handled, even when a step fails half-way
            observed, self._observed = self._observed, _Observations()
            observed.record(self._records_metric)
        self._settle(now)
        return len(polled)

    def _handle(self, polled: list[Polled]) -> float:
        """Join the polled records, decide the regions they complete, time out the overdue; the step's
        clock reading."""
        self._apply_rebalances()
        now = self.clock()
        owned = self.consumer.raw.assignment()
        complete: list[OpenRegion] = []
        for record in polled:
            # A record of a partition no longer owned was fetched before a revoke.
            if KafkaTopicPartition(record.topic, record.partition) in owned:
                self._consume(record, now, complete)
        self._decide(complete)
        for region in self.state.overdue(now, self.settings.timeout_s, self._caught_up):
            self._time_out(region, now)
        return now

    def drain(self) -> None:
        """Acknowledge everything sent and commit (graceful stop; open regions are re-read later)."""
        self._settle(self.clock(), force=True)

    def close(self) -> None:
        """Leave the group (uncommitted records go to other members) and close the clients."""
        self.consumer.close()
        self.producer.close(self.settings.produce_timeout_s)
        close_producer(self.dead_letters, self.settings.produce_timeout_s)
        self._pairs_reader.close()

    # --- one record -----------------------------------------------------------------------------

    def _consume(self, record: Polled, now: float, complete: list[OpenRegion]) -> None:
        self._consumed[(record.topic, record.partition)] = record.offset + 1
        self._observed.records[record.topic] += 1
        if isinstance(record, UndecodableRecord):
            self._dead_letter([record], CODE_UNDECODABLE, record.reason)
            return
        added = self.state.add(record, now, self._pairs_next.get(record.partition, 0))
        if added.status in (Status.LATE, Status.DUPLICATE):
            metrics.DROPPED.labels(added.status.value, record.topic).inc()
        elif added.status is Status.COMPLETE:
            assert added.region is not None  # COMPLETE always names its region
            complete.append(added.region)  # decided with the rest of the poll; later records: DUPLICATE

    def _decide(self, complete: list[OpenRegion]) -> None:
        """One decision (or dead letters) for every region the poll completed, in completion order."""
        decidable: list[OpenRegion] = []
        for region in complete:
            description = region.message(Kind.DESCRIPTION)
            localization, semantic = region.message(Kind.LOCALIZATION), region.message(Kind.SEMANTIC)
            problem = run_mismatch(description, localization, semantic)  # candidates: decide_all
            failure = None if problem else upstream_failure(description, localization, semantic)
            if problem:
                self._reject(region, CODE_MISMATCH, problem)
            elif failure is not None:  # the failing stage dead-lettered its input already
                self._produce(region, upstream_failed(description, failure, self.rules), 0)
            else:
                decidable.append(region)
        if not decidable:
            return
        started = time.perf_counter()
        decisions = self._decisions(decidable)
        metrics.DECIDE_SECONDS.observe(time.perf_counter() - started)
        metrics.DECIDE_BATCH.observe(len(decidable))
        for region, decision in zip(decidable, decisions, strict=True):
            if isinstance(decision, RecordsMismatch):
                self._reject(region, CODE_MISMATCH, str(decision))
            elif isinstance(decision, ValueError):  # e.g. an unknown coordinate format, a non-finite score
                self._reject(region, CODE_INVALID, str(decision))
            elif isinstance(decision, Exception):  # a bug must not stop the stream: dead-letter the region
                self._reject(region, CODE_INTERNAL, f"{type(decision).__name__}: {decision}")
            else:
                self._produce(region, decision, len(region.message(Kind.DESCRIPTION).candidates))

    def _decisions(self, regions: list[OpenRegion]) -> list[pairs_pb2.PairDecision | Exception]:
        """``decide_all`` of the regions; when the batch raises (a bug), each region alone, so that only
        the region that triggers it is dead-lettered (with the trace logged)."""
        inputs = [
            (r.message(Kind.DESCRIPTION), r.message(Kind.LOCALIZATION), r.message(Kind.SEMANTIC))
            for r in regions
        ]
        try:
            return list(decide_all(inputs, self.rules))
        except Exception as exc:
            if len(regions) > 1:
                return [self._decisions([region])[0] for region in regions]
            _LOG.exception("unexpected error deciding region %s", regions[0].region_id)
            return [exc]

    def _time_out(self, region: OpenRegion, now: float) -> None:
        missing = self.state.missing(region)
        waited = now - region.opened_at
        self._dead_letter(
            list(region.records.values()),
            CODE_TIMED_OUT,
            f"no {', '.join(missing)} record after {waited:.1f}s",
        )
        description = region.message(Kind.DESCRIPTION)
        self._produce(region, timed_out(region.region_id, description, missing, waited, self.rules), 0)

    def _reject(self, region: OpenRegion, code: str, message: str) -> None:
        """Dead-letter every record of a region that cannot be decided; it counts as done."""
        self._dead_letter(list(region.records.values()), code, message)
        self.state.close(region)

    def _produce(self, region: OpenRegion, decision: pairs_pb2.PairDecision, candidates: int) -> None:
        # Partition p of `pairs` holds the decisions of input partition p (module doc) by construction,
        # whatever partitioner wrote the inputs (and the client skips hashing the key).
        sent = self.producer.send(self.pairs, region.region_id, decision, partition=region.partition)
        self._pending.append(sent)
        self.state.close(region)
        self._observed.add(decision, self.clock() - region.opened_at, candidates)

    def _dead_letter(self, records: Sequence[Polled], code: str, message: str) -> None:
        for record in records:
            _LOG.warning(
                "dead-lettering %s/%d@%d: %s %s", record.topic, record.partition, record.offset, code, message
            )
            info = common_pb2.ErrorInfo(
                stage=STAGE_NAME,
                code=code,
                message=message,
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
            )
            headers: Headers = [
                *record.headers,
                ("spr-error-code", code.encode()),
                ("spr-error-message", message.encode("utf-8", "replace")),
                ("spr-error-stage", STAGE_NAME.encode()),
                ("spr-error-info", info.SerializeToString()),
            ]
            if isinstance(record, UndecodableRecord):
                key, value = record.key, record.value
            else:
                key, value = record.key.encode("utf-8"), record.message.SerializeToString()
            self._pending.append(
                self.dead_letters.send(self.settings.dead_letter_topic, key=key, value=value, headers=headers)
            )
            metrics.DEAD_LETTERS.labels(code).inc()
            common_metrics.ERRORS.labels(ERROR_COMPONENT, code).inc()

    # --- acknowledgement and commit -------------------------------------------------------------

    def _settle(self, now: float, force: bool = False) -> None:
        """Wait for the acks of everything sent, then commit the safe offsets (when due)."""
        if not force and now - self._last_commit < self.settings.commit_interval_s:
            return
        self._last_commit = now
        try:
            self.producer.flush(timeout=self.settings.produce_timeout_s)
            self.dead_letters.flush(timeout=self.settings.produce_timeout_s)
        except KafkaTimeoutError as exc:
            self._recover(f"no acknowledgement within {self.settings.produce_timeout_s:g}s ({exc})")
            return
        failed = [future for future in self._pending if future.failed()]
        for future in self._pending:
            if future.succeeded() and future.value.topic == self.pairs.name:
                partition = future.value.partition
                self._pairs_next[partition] = max(self._pairs_next.get(partition, 0), future.value.offset + 1)
        self._pending.clear()
        if failed:
            self._recover(f"{len(failed)} records were not acknowledged ({failed[0].exception})")
            return
        self._commit()
        self._observe_lag()

    def _recover(self, why: str) -> None:
        """Some output may be missing: start the producers afresh and re-read from the commit point.

        New producers, because an idempotent producer whose batch failed (e.g. OutOfOrderSequenceNumber
        after a broker lost its producer state) can leave later batches pending for ever.
        """
        _LOG.error("%s; re-reading from the commit point with new producers", why)
        metrics.RECOVERIES.inc()
        self.producer.close(0)
        close_producer(self.dead_letters, 0)
        self.producer = ProtoProducer(self.kafka, batch_size=PRODUCE_BATCH_BYTES, linger_ms=PRODUCE_LINGER_MS)
        self.dead_letters = KafkaProducer(**self.kafka.producer_kwargs())
        self._pending.clear()
        self._rewind()

    def _commit(self) -> None:
        offsets = {}
        owned = self.consumer.raw.assignment()
        for (topic, partition), consumed_next in self._consumed.items():
            if KafkaTopicPartition(topic, partition) not in owned:
                continue
            offset = self.state.commit_offset(topic, partition, consumed_next)
            pairs_from = self.state.pairs_from(partition, self._pairs_next.get(partition, 0))
            offsets[KafkaTopicPartition(topic, partition)] = OffsetAndMetadata(
                offset, f"{PAIRS_FROM}{pairs_from}", -1
            )
        if not offsets:
            return
        try:
            self.consumer.raw.commit(offsets=offsets)
        except (CommitFailedError, RebalanceInProgressError) as exc:
            # The group rebalanced: the partitions' new owners re-read from the last commit.
            _LOG.warning("commit skipped, the group is rebalancing: %s", exc)
            metrics.COMMITS.labels("failed").inc()
            return
        metrics.COMMITS.labels("ok").inc()

    def _rewind(self) -> None:
        """After a failed produce: forget everything and re-read every owned partition from its commit.

        Leaving and re-joining the group is the same path as a restart: positions come from the
        committed offsets and the assignment seeds the decided regions from `pairs`.
        """
        self.state.clear_open()
        self.state.clear_decided()
        self._consumed.clear()
        self.consumer.raw.unsubscribe()
        self.consumer.raw.subscribe([t.name for t in self.inputs], listener=self._rebalances)

    # --- partitions coming and going ------------------------------------------------------------

    def _apply_rebalances(self) -> None:
        for assigned, partitions in self._rebalances.take():
            if assigned:
                self._to_seed |= {tp.partition for tp in partitions}
                _LOG.info("partitions assigned: %s", sorted(partitions))
                continue
            # Revoked: the last commit is a safe point, the new owner re-reads from there.
            dropped = self.state.drop_partitions({tp.partition for tp in partitions})
            for tp in partitions:
                self._consumed.pop((tp.topic, tp.partition), None)
                self._to_seed.discard(tp.partition)
            _LOG.info(
                "partitions revoked: %s (%d open regions left to their next owner)",
                sorted(partitions),
                dropped,
            )
        if self._to_seed:
            self._seed_decided()

    def _seed_decided(self) -> None:
        """Remember the regions decided after the commit point of newly owned partitions (module doc)."""
        partitions, self._to_seed = sorted(self._to_seed), set()
        for partition in partitions:
            pairs_tp = KafkaTopicPartition(self.pairs.name, partition)
            end = int(self._pairs_reader.end_offsets([pairs_tp])[pairs_tp])
            self._pairs_next[partition] = max(self._pairs_next.get(partition, 0), end)
            start = self._scan_start(partition, pairs_tp, end)
            if start is not None and start < end:
                seeded = self._read_decided(pairs_tp, start, end)
                _LOG.info(
                    "partition %d: read pairs [%d, %d): %d decisions of this run",
                    partition,
                    start,
                    end,
                    seeded,
                )
            else:
                _LOG.info(
                    "partition %d: nothing to read in pairs (committed mark %s, end %d)",
                    partition,
                    start,
                    end,
                )

    def _scan_start(self, partition: int, pairs_tp: KafkaTopicPartition, end: int) -> int | None:
        """The committed ``pairs_from`` mark; None when nothing was ever committed (all is re-read).

        A broker that drops commit metadata (Tansu does) leaves the mark out: then the last
        ``seed_scan_records`` decisions of the partition are read instead.
        """
        marks, committed_any = [], False
        for topic in self.inputs:
            try:
                committed = self.consumer.raw.committed(
                    KafkaTopicPartition(topic.name, partition), metadata=True, timeout_ms=COMMITTED_TIMEOUT_MS
                )
            except KafkaError as exc:  # unknown: read the last seed_scan_records decisions instead
                _LOG.warning("committed offset of %s/%d unknown: %s", topic.name, partition, exc)
                committed = OffsetAndMetadata(0, "", -1)
            committed_any |= committed is not None
            metadata = getattr(committed, "metadata", "") or ""
            if metadata.startswith(PAIRS_FROM):
                marks.append(int(metadata.removeprefix(PAIRS_FROM)))
        if marks:
            return min(marks)
        if not committed_any:
            return None
        begin = int(self._pairs_reader.beginning_offsets([pairs_tp])[pairs_tp])
        return max(begin, end - self.settings.seed_scan_records)

    def _read_decided(self, pairs_tp: KafkaTopicPartition, start: int, end: int) -> int:
        reader = self._pairs_reader
        reader.assign([pairs_tp])
        reader.seek(pairs_tp, start)
        seeded = 0
        deadline = time.monotonic() + SEED_TIMEOUT_S
        while reader.position(pairs_tp) < end:
            if time.monotonic() > deadline:
                _LOG.error(
                    "reading %s up to %d timed out; duplicates (same pair ids) may follow", pairs_tp, end
                )
                break
            for records in reader.poll(timeout_ms=500).values():
                for raw in records:
                    record = decode_record(self.pairs, raw)
                    if (
                        isinstance(record, ConsumedRecord)
                        and record.message.lineage.run_id == self.rules.run_id
                    ):
                        self.state.remember_decided(record.message.region_id)
                        seeded += 1
        return seeded

    # --- lag ------------------------------------------------------------------------------------

    def _caught_up(self, topic: str, partition: int) -> bool:
        """True when the consumer has read everything the broker had on that input partition."""
        tp = KafkaTopicPartition(topic, partition)
        raw = self.consumer.raw
        if tp not in raw.assignment():
            return False
        highwater = raw.highwater(tp)
        position = self._consumed.get((topic, partition))
        if position is None:
            try:
                position = raw.position(tp, timeout_ms=0)
            except KafkaError:
                return False
        return highwater is not None and position is not None and position >= highwater

    def _observe_lag(self) -> None:
        metrics.OPEN_REGIONS.set(self.state.open_count)
        raw = self.consumer.raw
        for tp in raw.assignment():
            highwater = raw.highwater(tp)
            position = self._consumed.get((tp.topic, tp.partition))
            if highwater is not None and position is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Queues group rebalances for the builder's thread.

    kafka-python calls listeners on its IO thread, where no blocking client call is allowed, so the
    work (dropping revoked state, reading `pairs` for assigned partitions) happens after the poll.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[bool, list[KafkaTopicPartition]]] = []

    def on_partitions_revoked(self, revoked: Sequence[KafkaTopicPartition]) -> None:
        with self._lock:
            self._events.append((False, list(revoked)))

    def on_partitions_assigned(self, assigned: Sequence[KafkaTopicPartition]) -> None:
        with self._lock:
            self._events.append((True, list(assigned)))

    def take(self) -> list[tuple[bool, list[KafkaTopicPartition]]]:
        """The events since the last call: (assigned?, partitions), in order."""
        with self._lock:
            events, self._events = self._events, []
        return events


class _Observations:
    """The metrics of one step's records and decisions, recorded together at its end: one update per
    metric and step instead of several per decision (each update takes a lock)."""

    def __init__(self) -> None:
        self.records: Counter[str] = Counter()  # input records consumed, by topic
        self.join_seconds: list[float] = []
        self.candidates = 0
        self.chosen: list[float] = []  # rewards, margins and replaced boxes of the pairs built
        self.rejected: list[float] = []
        self.margins: list[float] = []
        self.boxes_replaced: list[float] = []
        self.skips: Counter[str] = Counter()  # skip decisions, by reason in lower case

    def add(self, decision: pairs_pb2.PairDecision, join_seconds: float, candidates: int) -> None:
        self.join_seconds.append(join_seconds)
        self.candidates += candidates
        if decision.WhichOneof("decision") == "pair":
            pair = decision.pair
            self.chosen.append(pair.chosen.reward)
            self.rejected.append(pair.rejected.reward)
            self.margins.append(pair.margin)
            self.boxes_replaced.append(pair.chosen.boxes_replaced)
        else:
            self.skips[pairs_pb2.SkipReason.Name(decision.skip).removeprefix("SKIP_REASON_").lower()] += 1

    def record(self, records_metric: dict[str, Any]) -> None:
        """Update the metrics with everything added."""
        for topic, count in self.records.items():
            records_metric[topic].inc(count)
        observe_many(metrics.JOIN_SECONDS, self.join_seconds)
        if self.candidates:
            metrics.CANDIDATES.inc(self.candidates)
        if self.chosen:
            metrics.PAIRS_BUILT.inc(len(self.chosen))
        observe_many(metrics.CHOSEN_REWARD, self.chosen)
        observe_many(metrics.REJECTED_REWARD, self.rejected)
        observe_many(metrics.MARGIN, self.margins)
        observe_many(metrics.BOXES_REPLACED, self.boxes_replaced)
        for name, count in self.skips.items():
            metrics.DECISIONS.labels(name).inc(count)
