"""The ``adapters`` topic as the admin reads it, into :class:`services.adapters.state.AdapterHistory`.

After a restart an alias may be known only by its last move (the topic is compacted); rollback then
needs an explicit ``to_version``.

:class:`AdapterTopicReader` keeps one consumer (no group: the admin needs the whole state, not a
share) and, on each :meth:`~AdapterTopicReader.sync`, reads up to the end offsets of that moment,
so a caller sees every move acknowledged before it asked, its own included.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from services.adapters.state import AdapterHistory
from services.admin.settings import fail_fast
from services.common.errors import UpstreamUnavailable
from services.common.kafka_io import KafkaSettings, UndecodableRecord, decode_record, ensure_topics
from services.common.topics import adapters_topic

_LOG = logging.getLogger(__name__)
_UNKNOWN_TOPIC = 3  # Kafka error code UNKNOWN_TOPIC_OR_PARTITION


class AdapterTopicReader:
    """Reads the compacted ``adapters`` topic incrementally; thread-safe."""

    def __init__(self, kafka: KafkaSettings, *, sync_timeout_s: float = 10.0, poll_timeout_ms: int = 100):
        self.kafka = kafka
        self.topic = adapters_topic()
        self.sync_timeout_s = sync_timeout_s
        self.poll_timeout_ms = poll_timeout_ms
        self._lock = threading.Lock()
        self._consumer: Any = None
        self._assigned: list[TopicPartition] = []
        self._history = AdapterHistory()

    def sync(self) -> AdapterHistory:
        """A copy of the state after every event acknowledged before this call.

        Raises :class:`UpstreamUnavailable` when the broker cannot be read; the next call starts over
        from the beginning of the topic.
        """
        with self._lock:
            try:
                self._catch_up()
            except KafkaError as exc:
                self._reset()
                raise UpstreamUnavailable(f"cannot read the adapters topic: {exc}") from exc
            return copy.deepcopy(self._history)

    def close(self) -> None:
        """Close the consumer."""
        with self._lock:
            self._reset()

    def _connect(self) -> Any:
        if self._consumer is None:
            self._consumer = KafkaConsumer(
                **self.kafka.common_kwargs(),
                **fail_fast(self.kafka),
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            self._history = AdapterHistory()
        if not self._assigned:
            self._assigned = self._partitions()
            self._consumer.assign(self._assigned)
            self._consumer.seek_to_beginning(*self._assigned)
        return self._consumer

    def _partitions(self) -> list[TopicPartition]:
        """The topic's partitions, creating the topic if needed (the admin may start before any trainer).

        Asked through an admin client: the consumer's own metadata calls (``partitions_for_topic``)
        wait forever while the broker is down, the admin client fails within its timeout.
        """
        admin = KafkaAdminClient(**self.kafka.admin_kwargs(), **fail_fast(self.kafka))
        try:
            entry = admin.describe_topics([self.topic.name])[0]
            if entry["error_code"] == _UNKNOWN_TOPIC:
                ensure_topics(self.kafka, [self.topic])
                entry = admin.describe_topics([self.topic.name])[0]
        finally:
            admin.close()
        return [TopicPartition(self.topic.name, p["partition_index"]) for p in entry["partitions"]]

    def _catch_up(self) -> None:
        consumer = self._connect()
        end_offsets = consumer.end_offsets(self._assigned)
        deadline = time.monotonic() + self.sync_timeout_s
        while self._behind(consumer, end_offsets):
            if time.monotonic() > deadline:
                raise UpstreamUnavailable(
                    f"reading the adapters topic up to its end took over {self.sync_timeout_s:g}s"
                )
            self._poll_once(consumer)

    def _behind(self, consumer: Any, end_offsets: dict[TopicPartition, int]) -> bool:
        for tp, end in end_offsets.items():
            # Bounded: without a timeout, position() waits forever for a broker that is down.
            position = consumer.position(tp, timeout_ms=self.kafka.request_timeout_ms)
            if position is None or position < end:
                return True
        return False

    def _poll_once(self, consumer: Any) -> None:
        for records in consumer.poll(timeout_ms=self.poll_timeout_ms).values():
            for record in records:
                if record.value is None:  # tombstone: compaction removed the key
                    continue
                decoded = decode_record(self.topic, record)
                if isinstance(decoded, UndecodableRecord):
                    _LOG.error(
                        "skipping adapters record %s:%s: %s", record.partition, record.offset, decoded.reason
                    )
                    continue
                self._history.apply(decoded.message)

    def _reset(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception:  # closing a broken client must not hide the error that broke it
                _LOG.debug("closing the adapters consumer failed", exc_info=True)
        self._consumer = None
        self._assigned = []
