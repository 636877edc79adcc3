"""Read a partition backwards, chunk by chunk: how the sampler and replay find where they stopped.

Both write their position into each record's headers, so after a crash (even ``kill -9``) the last
records of the output topic say what was already written; no separate checkpoint can disagree with
the topic itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from services.common.kafka_io import KafkaSettings

#: Records read per step backwards.
CHUNK_RECORDS = 500


def reader(settings: KafkaSettings) -> KafkaConsumer:
    """A consumer outside any group, for assigned reads."""
    return KafkaConsumer(**settings.common_kwargs(), enable_auto_commit=False, group_id=None)


def partitions_of(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic`` (empty when the topic does not exist)."""
    numbers = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, number) for number in sorted(numbers)]


def read_range(
    consumer: KafkaConsumer, partition: TopicPartition, start: int, stop: int, timeout_s: float = 60.0
) -> list[Any]:
    """Raw records of ``partition`` with ``start <= offset < stop``, in offset order.

    Raises TimeoutError when the broker hands out nothing for ``timeout_s``.
    """
    consumer.assign([partition])
    consumer.seek(partition, start)
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while consumer.position(partition) < stop:
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading {partition} [{start}, {stop}) made no progress for {timeout_s} s")
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(r for r in batch if r.offset < stop)
            deadline = time.monotonic() + timeout_s
    return records


def end_offset(consumer: KafkaConsumer, partition: TopicPartition) -> int:
    """The offset after the last record of ``partition``.

    ListOffsets(latest) is cross-checked with the high watermark of a fetch: Tansu 0.6 answers
    ListOffsets with the base offset of the last record batch + 1, which is short by every record
    that batch holds after its first. On Apache Kafka the two agree.
    """
    listed = int(consumer.end_offsets([partition])[partition])
    begin = int(consumer.beginning_offsets([partition])[partition])
    consumer.assign([partition])
    consumer.seek(partition, max(listed - 1, begin))
    deadline = time.monotonic() + 5.0
    while consumer.highwater(partition) is None and time.monotonic() < deadline:
        consumer.poll(timeout_ms=200, max_records=1)
    return max(listed, consumer.highwater(partition) or listed)


def newest_first(
    consumer: KafkaConsumer, partition: TopicPartition, chunk: int = CHUNK_RECORDS
) -> Iterator[Any]:
    """Records of ``partition`` from its end backwards (lazily: stop iterating to stop reading)."""
    begin = consumer.beginning_offsets([partition])[partition]
    stop = end_offset(consumer, partition)
    while stop > begin:
        start = max(begin, stop - chunk)
        yield from reversed(read_range(consumer, partition, start, stop))
        stop = start


def header(record: Any, name: str) -> str | None:
    """A header of a raw record as text (the first with that name), None when absent."""
    for key, value in record.headers or []:
        if key == name:
            return bytes(value).decode("utf-8", "replace")
    return None
