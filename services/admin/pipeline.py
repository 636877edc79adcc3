"""Stage health from Kafka's own bookkeeping: consumer lag, throughput and dead letters per stage.

For each configured stage (consumer group + input topics):

* ``consumer_lag`` — Σ over its input partitions of ``end offset - committed offset``; a partition
  the group never committed counts from its earliest offset (the stages start at ``earliest``), and
  a missing group therefore lags by everything retained;
* ``records_per_second`` — growth of the group's committed offsets over about the last
  ``rate_window_s``, measured between calls of :meth:`PipelineStatsReader.read` (0 on the first
  call; since the previous call when calls are further apart than the window);
* ``dead_letters`` — Σ of the end offsets of its dead-letter topics, i.e. records ever dead-lettered
  (a counter, not what retention kept); a dead-letter topic that does not exist counts 0.

Stages that share an input topic share its dead-letter topic (``<topic>.dlq``), so their counts are
the same number. Pairs built/skipped are not counted here: only the pair builder knows them, and it
does not export them yet.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import OffsetSpec
from kafka.errors import KafkaError

from services.admin import metrics
from services.admin.settings import StageSpec, fail_fast
from services.common.errors import UpstreamUnavailable
from services.common.kafka_io import KafkaSettings

_UNKNOWN_TOPIC = 3  # Kafka error code UNKNOWN_TOPIC_OR_PARTITION
_MAX_SAMPLES = 1024


@dataclass(frozen=True)
class StageLag:
    """What :meth:`PipelineStatsReader.read` reports for one stage."""

    stage: str
    consumer_lag: int
    committed: int
    records_per_second: float
    dead_letters: int


@dataclass(frozen=True)
class TopicOffsets:
    """Earliest and latest offset of every existing partition of the topics asked for."""

    earliest: dict[TopicPartition, int]
    latest: dict[TopicPartition, int]

    def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        wanted = set(topics)
        return sorted(
            (tp for tp in self.latest if tp.topic in wanted), key=lambda tp: (tp.topic, tp.partition)
        )


def stage_lag(
    offsets: TopicOffsets, committed: dict[TopicPartition, int], topics: Sequence[str]
) -> tuple[int, int]:
    """``(lag, committed total)`` of a group over ``topics``; never negative per partition."""
    lag = total = 0
    for tp in offsets.partitions(topics):
        start, end = offsets.earliest.get(tp, 0), offsets.latest[tp]
        # Offsets below the earliest were deleted by retention: the group cannot read them anyway.
        position = max(committed.get(tp, start), start)
        lag += max(end - position, 0)
        total += committed.get(tp, 0)
    return lag, total


class RateMeter:
    """Growth per second of a counter sampled at irregular times, over about ``window_s``."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque(maxlen=_MAX_SAMPLES)

    def update(self, now: float, value: int) -> float:
        """Record ``value`` at ``now``; return the rate since the window's base sample (0 if none)."""
        samples = self._samples
        # Keep the newest sample at or before the window's start as the base, so that callers who
        # ask less often than once per window still get the rate since their previous call.
        while len(samples) >= 2 and samples[1][0] <= now - self.window_s:
            samples.popleft()
        rate = 0.0
        if samples and now > samples[0][0]:
            # A group reset moves offsets back; that is not negative throughput.
            rate = max(value - samples[0][1], 0) / (now - samples[0][0])
        samples.append((now, value))
        return rate


class PipelineStatsReader:
    """Computes :class:`StageLag` per stage with one admin client; thread-safe."""

    def __init__(
        self,
        kafka: KafkaSettings,
        stages: Sequence[StageSpec],
        rate_window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kafka = kafka
        self.stages = tuple(stages)
        self.rate_window_s = rate_window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._admin: Any = None
        self._rates = {s.stage: RateMeter(rate_window_s) for s in self.stages}

    def read(self) -> list[StageLag]:
        """Every stage's lag, rate and dead letters now; :class:`UpstreamUnavailable` if Kafka is down."""
        with self._lock:
            try:
                return self._read()
            except KafkaError as exc:
                self._reset()
                raise UpstreamUnavailable(f"cannot read consumer offsets from Kafka: {exc}") from exc

    def close(self) -> None:
        """Close the admin client."""
        with self._lock:
            self._reset()

    def _read(self) -> list[StageLag]:
        admin = self._connect()
        topics = {t for s in self.stages for t in (*s.topics, *s.dead_letter_topics)}
        offsets = self._offsets(admin, topics)
        now = self._clock()
        out = []
        for spec in self.stages:
            committed = self._committed(admin, spec.group_id)
            lag, total = stage_lag(offsets, committed, spec.topics)
            dead = sum(offsets.latest[tp] for tp in offsets.partitions(spec.dead_letter_topics))
            out.append(StageLag(spec.stage, lag, total, self._rates[spec.stage].update(now, total), dead))
            metrics.CONSUMER_LAG.labels(spec.stage).set(lag)
            metrics.DEAD_LETTERS.labels(spec.stage).set(dead)
        return out

    def _connect(self) -> Any:
        if self._admin is None:
            self._admin = KafkaAdminClient(**self.kafka.admin_kwargs(), **fail_fast(self.kafka))
        return self._admin

    @staticmethod
    def _offsets(admin: Any, topics: set[str]) -> TopicOffsets:
        partitions = []
        for entry in admin.describe_topics(sorted(topics)):
            if entry["error_code"] == _UNKNOWN_TOPIC:
                continue  # e.g. a dead-letter topic no failure has created yet
            partitions += [TopicPartition(entry["name"], p["partition_index"]) for p in entry["partitions"]]
        if not partitions:
            return TopicOffsets({}, {})

        def lookup(spec: OffsetSpec) -> dict[TopicPartition, int]:
            found = admin.list_partition_offsets({tp: spec for tp in partitions})
            return {tp: int(value.offset) for tp, value in found.items()}

        return TopicOffsets(lookup(OffsetSpec.EARLIEST), lookup(OffsetSpec.LATEST))

    @staticmethod
    def _committed(admin: Any, group_id: str) -> dict[TopicPartition, int]:
        # One group per request: brokers before OffsetFetch v8 cannot answer several at once.
        found = admin.list_group_offsets({group_id: None}).get(group_id, {})
        return {tp: int(meta.offset) for tp, meta in found.items() if meta.offset >= 0}

    def _reset(self) -> None:
        if self._admin is not None:
            # Closing a broken client must not hide the error that broke it.
            with contextlib.suppress(Exception):
                self._admin.close()
        self._admin = None
