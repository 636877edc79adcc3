"""The pair builder's join state: per region, the description and score records seen so far.

No transport here: records go in as :class:`ConsumedRecord` (what ``ProtoConsumer`` yields), and the
state answers what to do with each one, which regions are overdue, and which input offsets are safe to
commit. :mod:`services.pairs.builder` drives it from Kafka; the tests drive it directly.

Bookkeeping kept per input partition so that the commit point is cheap to find: the offset of every
open region's record on each topic partition; the smallest is the first that must be read again after
a restart (taken as a minimum, not by arrival order, so a re-delivery after a rebalance cannot break it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from services.common.kafka_io import ConsumedRecord

TopicPartition = tuple[str, int]


class Kind(str, Enum):
    """The three inputs of a region."""

    DESCRIPTION = "description"
    LOCALIZATION = "localization"
    SEMANTIC = "semantic"


class Status(str, Enum):
    """What :meth:`JoinState.add` did with a record."""

    OPENED = "opened"  # first record of a region
    WAITING = "waiting"  # joined an open region that still misses some input
    COMPLETE = "complete"  # the region has every required input: decide it now
    LATE = "late"  # the region was already decided (or timed out): dropped
    DUPLICATE = "duplicate"  # the open region already holds a record of this kind: dropped


@dataclass(slots=True)
class OpenRegion:
    """One region being joined."""

    region_id: str
    partition: int
    opened_at: float  # the caller's clock (monotonic seconds) when its first record arrived
    pairs_mark: int  # next offset of its `pairs` partition when it opened (see builder docstring)
    records: dict[Kind, ConsumedRecord[Any]] = field(default_factory=dict)

    def message(self, kind: Kind) -> Any:
        """The decoded message of that input, or None when it has not arrived."""
        record = self.records.get(kind)
        return None if record is None else record.message


def region_id_of(record: ConsumedRecord[Any]) -> str:
    """The region a record belongs to: the id inside the message, else the key (they are equal)."""
    message = record.message
    inner = message.region.region_id if hasattr(message, "region") else message.region_id
    return str(inner or record.key)


@dataclass(frozen=True, slots=True)
class Added:
    """The outcome of adding one record: a status and the region it concerns (None when dropped)."""

    status: Status
    region: OpenRegion | None = None


class JoinState:
    """Open regions, the LRU of decided region ids, and the per-partition commit bookkeeping."""

    def __init__(self, kinds: Mapping[str, Kind], required: Iterable[Kind], decided_capacity: int) -> None:
        """``kinds`` maps each input topic name to its kind; ``required`` are the kinds a decision needs."""
        self.kinds = dict(kinds)
        self.required = frozenset(required)
        self.decided_capacity = decided_capacity
        self._open: dict[str, OpenRegion] = {}  # in opening order: the oldest first
        self._decided: OrderedDict[str, None] = OrderedDict()
        self._on_partition: dict[TopicPartition, dict[str, int]] = {}  # region id -> offset, offset order
        self._marks: dict[int, dict[str, int]] = {}  # partition -> region id -> pairs mark, opening order

    # --- records in -----------------------------------------------------------------------------

    def add(self, record: ConsumedRecord[Any], now: float, pairs_mark: int = 0) -> Added:
        """Join one decoded input record into its region's state."""
        region_id = region_id_of(record)
        if region_id in self._decided:
            return Added(Status.LATE)
        kind = self.kinds[record.topic]
        region = self._open.get(region_id)
        status = Status.WAITING
        if region is None:
            region = OpenRegion(region_id, record.partition, now, pairs_mark)
            self._open[region_id] = region
            self._marks.setdefault(record.partition, {})[region_id] = pairs_mark
            status = Status.OPENED
        elif kind in region.records:
            return Added(Status.DUPLICATE, region)
        region.records[kind] = record
        self._on_partition.setdefault((record.topic, record.partition), {})[region_id] = record.offset
        if self.required <= region.records.keys():
            return Added(Status.COMPLETE, region)
        return Added(status, region)

    def close(self, region: OpenRegion) -> None:
        """Forget an open region and remember it as decided (its later records are LATE)."""
        self._forget(region)
        self.remember_decided(region.region_id)

    def remember_decided(self, region_id: str) -> None:
        """Add to the LRU of decided regions (also used to seed it from the `pairs` topic)."""
        self._decided[region_id] = None
        self._decided.move_to_end(region_id)
        while len(self._decided) > self.decided_capacity:
            self._decided.popitem(last=False)

    def is_decided(self, region_id: str) -> bool:
        """True when a decision for the region was made (as far as the LRU remembers)."""
        return region_id in self._decided

    def _forget(self, region: OpenRegion) -> None:
        self._open.pop(region.region_id, None)
        for record in region.records.values():
            self._on_partition.get((record.topic, record.partition), {}).pop(region.region_id, None)
        self._marks.get(region.partition, {}).pop(region.region_id, None)

    # --- time -----------------------------------------------------------------------------------

    def overdue(
        self, now: float, timeout_s: float, caught_up: Callable[[str, int], bool]
    ) -> list[OpenRegion]:
        """Open regions older than ``timeout_s`` whose missing inputs' partitions are caught up.

        A missing record on a partition the consumer still lags behind may simply not be read yet, so
        such a region keeps waiting. The caller decides what to do with the regions returned (they stay
        open until :meth:`close`).
        """
        found = []
        for region in self._open.values():  # opening order: stop at the first one not yet due
            if now - region.opened_at < timeout_s:
                break
            missing = self.missing(region)
            if all(caught_up(topic, region.partition) for topic in missing):
                found.append(region)
        return found

    def missing(self, region: OpenRegion) -> list[str]:
        """Input topics whose record the region still waits for."""
        return sorted(
            topic for topic, kind in self.kinds.items() if kind in self.required - region.records.keys()
        )

    # --- commit bookkeeping ---------------------------------------------------------------------

    def commit_offset(self, topic: str, partition: int, consumed_next: int) -> int:
        """The offset to commit on a partition: its oldest open region's record, else ``consumed_next``.

        Committing past a record of an open region would lose that record on restart; everything
        before the oldest open one has been decided (or dropped) and acknowledged.
        """
        waiting = self._on_partition.get((topic, partition))
        if waiting:
            return min(consumed_next, min(waiting.values()))
        return consumed_next

    def pairs_from(self, partition: int, pairs_next: int) -> int:
        """Where a restart must scan `pairs` from to know every decision made after the commit point."""
        marks = self._marks.get(partition)
        if marks:
            return min(pairs_next, min(marks.values()))
        return pairs_next

    # --- housekeeping ---------------------------------------------------------------------------

    def drop_partitions(self, partitions: Iterable[int]) -> int:
        """Forget the open regions of partitions this process no longer owns; returns how many."""
        gone = set(partitions)
        dropped = [r for r in self._open.values() if r.partition in gone]
        for region in dropped:
            self._forget(region)
        return len(dropped)

    def clear_open(self) -> None:
        """Forget every open region (they are re-read from the committed offsets)."""
        self._open.clear()
        self._on_partition.clear()
        self._marks.clear()

    def clear_decided(self) -> None:
        """Forget the decided LRU (after a failed produce some of it may never have been written)."""
        self._decided.clear()

    @property
    def open_count(self) -> int:
        """Regions waiting for some of their records."""
        return len(self._open)

    def __iter__(self) -> Iterator[OpenRegion]:
        return iter(list(self._open.values()))
