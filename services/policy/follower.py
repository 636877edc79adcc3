"""Every policy replica follows the compacted `adapters` topic itself, so all replicas converge
without anyone calling each of them (SPEC section 3).

The follower reads the topic from the beginning with no consumer group (each replica needs the
whole state, not a share of it). Start-up replays the compacted history into a state first and
only then loads what aliases point at, so a replica does not load every version ever published.
After catch-up, a `published` event preloads the new version (so the alias switch that follows is
instant) and an `alias` event re-points an alias once its version is resident.

`on_change` runs once the caught-up state is applied and after every live event, so observers (the
replica's metrics) see what start-up loaded too: a promotion that lands while the replica is still
starting arrives through the catch-up, not as a live event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kafka import KafkaConsumer, TopicPartition

from services.adapters.state import AdapterHistory
from services.common.kafka_io import KafkaSettings, UndecodableRecord, decode_record, ensure_topics
from services.common.topics import adapters_topic
from services.policy.adapters import AdapterNotFound, AdapterRegistry
from spr.v1 import adapters_pb2

log = logging.getLogger(__name__)


class AdapterFollower:
    """Background thread applying `adapters` topic events to an `AdapterRegistry`."""

    def __init__(
        self,
        registry: AdapterRegistry,
        kafka: KafkaSettings,
        on_change: Callable[[], None] | None = None,
        poll_timeout_ms: int = 0,
        idle_s: float = 0.25,
    ) -> None:
        self.registry = registry
        self.kafka = kafka
        self.topic = adapters_topic()
        self.state = AdapterHistory()
        self.on_change = on_change
        self.poll_timeout_ms = poll_timeout_ms
        self.idle_s = idle_s
        self.consumer = KafkaConsumer(
            **kafka.common_kwargs(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adapter-follower", daemon=True)

    def start(self) -> AdapterFollower:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.consumer.close()

    def _assign_all_partitions(self) -> dict[TopicPartition, int]:
        partitions = self.consumer.partitions_for_topic(self.topic.name) or set()
        assigned = [TopicPartition(self.topic.name, p) for p in sorted(partitions)]
        self.consumer.assign(assigned)
        self.consumer.seek_to_beginning(*assigned)
        return dict(self.consumer.end_offsets(assigned)) if assigned else {}

    def _run(self) -> None:
        try:
            ensure_topics(self.kafka, [self.topic])  # a replica may start before any trainer
            end_offsets = self._assign_all_partitions()
            self._catch_up(end_offsets)
            self._apply_state()
            self._changed()
            self.caught_up.set()
            while not self._stop.is_set():
                events = self._poll()
                for event in events:
                    self._apply_live(event)
                if not events:
                    # Sleep between short polls rather than long-poll: a consumer waiting in poll() keeps
                    # taking the GIL from generation in this process (brokers that answer empty fetches
                    # at once make it spin), and adapter events are rare. Costs at most idle_s of latency.
                    self._stop.wait(self.idle_s)
        except Exception:  # a follower that dies silently would freeze the replica on old adapters
            log.exception("adapter follower stopped")
            raise

    def _poll(self) -> list[adapters_pb2.AdapterEvent]:
        events = []
        for records in self.consumer.poll(timeout_ms=self.poll_timeout_ms).values():
            for record in records:
                if record.value is None:  # tombstone: compaction removed the key
                    continue
                decoded = decode_record(self.topic, record)
                if isinstance(decoded, UndecodableRecord):
                    log.error(
                        "skipping adapters record %s:%s: %s", record.partition, record.offset, decoded.reason
                    )
                    continue
                events.append(decoded.message)
        return events

    def _catch_up(self, end_offsets: dict[TopicPartition, int]) -> None:
        while not self._stop.is_set() and any(
            self.consumer.position(tp) < end for tp, end in end_offsets.items()
        ):
            for event in self._poll():
                self.state.apply(event)

    def _apply_state(self) -> None:
        for alias, version in self.state.aliases.items():
            self._set_alias(alias, version)

    def _apply_live(self, event: adapters_pb2.AdapterEvent) -> None:
        self.state.apply(event)
        kind = event.WhichOneof("event")
        try:
            if kind == "published":
                self.registry.load(event.published.version)
            elif kind == "alias":
                self._set_alias(event.alias.alias, event.alias.version)
        except AdapterNotFound as exc:
            log.error("cannot load adapter: %s", exc)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _set_alias(self, alias: str, version: str) -> None:
        try:
            self.registry.set_alias(alias, version)
        except AdapterNotFound as exc:
            # Keep serving the previous version of the alias rather than failing requests.
            log.error("alias %s -> %s not applied: %s", alias, version, exc)
