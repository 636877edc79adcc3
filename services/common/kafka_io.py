"""Shared Kafka plumbing on kafka-python: typed protobuf producer/consumer and topic set-up.

Conventions every stage relies on:

* Records are keyed by a string id (the region id for the stream topics), UTF-8 encoded. The
  producer keeps kafka-python's default murmur2 partitioner, the same as the Java client, so one key
  lands on the same partition number on every topic with the same partition count: that is what
  lets the pair builder join the score topics locally.
* Every value is a serialized protobuf message with a header ``spr-schema: <full name>/<version>``,
  e.g. ``spr.v1.PairDecision/1``. Consumers check it before decoding and hand back records that fail
  the check (or fail to parse) as :class:`UndecodableRecord` so the caller can dead-letter them;
  nothing is dropped silently.
* Producers are idempotent with ``acks=all``; consumers commit manually after processing
  (at-least-once, duplicates are removed downstream by record ids).

Broker differences (the local emulators) enter only through :class:`KafkaSettings`, which the
dev stack fills in (``services.devstack.broker.client_settings``); nothing here knows about them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError, Message
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
)
from kafka.structs import OffsetAndMetadata

_LOG = logging.getLogger(__name__)

#: Header carrying the protobuf full name and schema version of a record value.
SCHEMA_HEADER = "spr-schema"

M = TypeVar("M", bound=Message)

Headers = list[tuple[str, bytes]]


class SchemaError(ValueError):
    """A header or value does not match the schema a topic expects."""


class TopicMismatchError(RuntimeError):
    """An existing topic differs from its declaration (partitions or config)."""


@dataclass(frozen=True)
class KafkaSettings:
    """Connection settings shared by every Kafka client of a process.

    ``api_version=None`` lets the client negotiate with the broker, which is what production (Apache
    Kafka) wants; the other knobs keep their usual meaning. Timeouts are in milliseconds.
    """

    bootstrap_servers: str
    client_id: str = "spr"
    api_version: tuple[int, ...] | None = None
    request_timeout_ms: int = 30_000
    session_timeout_ms: int = 45_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000

    def common_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every kafka-python client accepts."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": [
                server.strip() for server in self.bootstrap_servers.split(",") if server.strip()
            ],
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.api_version is not None:
            kwargs["api_version"] = self.api_version
        return kwargs

    def producer_kwargs(self) -> dict[str, Any]:
        """Idempotent, fully acknowledged producer: a retried send never duplicates or reorders."""
        return {
            **self.common_kwargs(),
            "acks": "all",
            "enable_idempotence": True,
            # <= 5 in-flight requests keeps ordering under retries with idempotence.
            "max_in_flight_requests_per_connection": 5,
            "linger_ms": 5,
        }

    def consumer_kwargs(self, group_id: str, *, auto_offset_reset: str = "earliest") -> dict[str, Any]:
        """Consumer-group member that commits manually, after processing."""
        return {
            **self.common_kwargs(),
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": auto_offset_reset,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
        }

    def admin_kwargs(self) -> dict[str, Any]:
        """Admin client (topic creation and checks)."""
        return self.common_kwargs()


@dataclass(frozen=True)
class Topic(Generic[M]):
    """A topic declaration: its name, the protobuf type of its values and how it is created."""

    name: str
    message_type: type[M]
    partitions: int = 1
    replication_factor: int = 1
    config: Mapping[str, str] = field(default_factory=dict)
    schema_version: int = 1
    #: Versions a consumer still accepts (defaults to ``{schema_version}``); for rolling upgrades.
    accepted_versions: frozenset[int] = frozenset()

    @property
    def schema(self) -> str:
        """Header value written by producers, e.g. ``spr.v1.PairDecision/1``."""
        return schema_id(self.message_type, self.schema_version)

    @cached_property
    def schema_header(self) -> bytes:
        """:attr:`schema` as the header's bytes; made once, as every record sent or read needs it."""
        return self.schema.encode("ascii")

    def accepts(self, version: int) -> bool:
        """True if consumers of this topic decode values written with schema ``version``."""
        return version in (self.accepted_versions or frozenset({self.schema_version}))


def schema_id(message_type: type[Message], version: int) -> str:
    """``<protobuf full name>/<version>``: the value of the :data:`SCHEMA_HEADER` header."""
    return f"{message_type.DESCRIPTOR.full_name}/{version}"


def parse_schema_id(raw: bytes) -> tuple[str, int]:
    """Split a header value into ``(full_name, version)``; raise :class:`SchemaError` if malformed."""
    try:
        name, _, version = raw.decode("ascii").rpartition("/")
        if not name:
            raise ValueError("no '/'")
        return name, int(version)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SchemaError(f"malformed {SCHEMA_HEADER} header {raw!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Producer


def close_producer(producer: KafkaProducer, timeout_s: float | None = None) -> None:
    """Close a producer, giving up on what it could not deliver within ``timeout_s``.

    kafka-python's ``close`` flushes first and raises when that times out, leaving its sender thread
    running; ``force_close`` is what ``close`` itself does with requests still pending.
    """
    try:
        producer.close(timeout=timeout_s)
    except KafkaTimeoutError:
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()


class ProtoProducer:
    """Sends protobuf messages to declared topics, keyed by id, with the schema header."""

    def __init__(self, settings: KafkaSettings, **overrides: Any) -> None:
        """Connect (bootstraps at once: fails fast if no broker answers)."""
        self._producer = KafkaProducer(**{**settings.producer_kwargs(), **overrides})
        self._tracked: set[str] = set()

    def send(
        self,
        topic: Topic[M],
        key: str,
        message: M,
        *,
        extra_headers: Headers | None = None,
        partition: int | None = None,
    ) -> Any:
        """Queue ``message`` on ``topic``; returns kafka-python's future of the record metadata.

        ``partition``: where it goes; by default the key's hash picks it (Kafka's murmur2 partitioner).
        Raises :class:`SchemaError` if ``message`` is not of the topic's declared type.
        """
        if not isinstance(message, topic.message_type):
            raise SchemaError(
                f"topic {topic.name} carries {topic.message_type.DESCRIPTOR.full_name}, "
                f"got {type(message).DESCRIPTOR.full_name}"
            )
        self._track(topic.name)
        headers: Headers = [(SCHEMA_HEADER, topic.schema_header), *(extra_headers or [])]
        return self._producer.send(
            topic.name,
            key=key.encode("utf-8"),
            value=message.SerializeToString(),
            headers=headers,
            partition=partition,
        )

    def _track(self, name: str) -> None:
        """Make the client keep metadata for ``name`` from the first send on.

        kafka-python (3.0.12) only tracks a topic whose partitions it did not know at send time. If
        its bootstrap Metadata answer already listed the topic, the topic stays untracked, and the
        next metadata refresh for the tracked topics drops its partitions: queued records then wait
        for "unknown leaders" until the delivery timeout. Apache Kafka answers the bootstrap request
        (an empty topic list) with no topics, but brokers that answer it with every topic (both
        local emulators do) trigger it. Registering each topic up front is harmless everywhere.
        """
        if name in self._tracked:
            return
        sender = getattr(self._producer, "_sender", None)
        if sender is not None and hasattr(sender, "add_topic"):
            sender.add_topic(name)  # the client's own thread-safe registration
        self._tracked.add(name)

    def send_and_wait(self, topic: Topic[M], key: str, message: M, timeout: float = 30.0) -> Any:
        """Send one record and block until the broker acknowledged it; returns its metadata."""
        return self.send(topic, key, message).get(timeout=timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Block until every queued record is acknowledged (or raise on timeout)."""
        self._producer.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush and close the connection; what is not delivered within ``timeout`` is abandoned."""
        close_producer(self._producer, timeout)

    def __enter__(self) -> ProtoProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Consumer


@dataclass(frozen=True)
class ConsumedRecord(Generic[M]):
    """A record whose header and value matched its topic's declaration."""

    topic: str
    partition: int
    offset: int
    key: str
    message: M
    schema_version: int
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class UndecodableRecord:
    """A record that failed the schema check or protobuf parsing; destined for a dead-letter topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    reason: str


Polled = ConsumedRecord[M] | UndecodableRecord


def decode_record(topic: Topic[M], record: Any) -> ConsumedRecord[M] | UndecodableRecord:
    """Check the schema header of a raw kafka-python record and parse its value."""
    headers = tuple((name, bytes(value)) for name, value in (record.headers or []))
    try:
        version = _check_header(topic, headers)
        message = topic.message_type.FromString(record.value or b"")
        key = (record.key or b"").decode("utf-8")
    except (SchemaError, DecodeError, UnicodeDecodeError) as exc:
        return UndecodableRecord(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            headers=headers,
            reason=f"{type(exc).__name__}: {exc}",
        )
    return ConsumedRecord(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=key,
        message=message,
        schema_version=version,
        timestamp_ms=record.timestamp,
        headers=headers,
    )


def _check_header(topic: Topic[Any], headers: tuple[tuple[str, bytes], ...]) -> int:
    values = [value for name, value in headers if name == SCHEMA_HEADER]
    if len(values) != 1:
        raise SchemaError(f"expected one {SCHEMA_HEADER} header, found {len(values)}")
    if values[0] == topic.schema_header and topic.accepts(topic.schema_version):  # no parsing needed
        return topic.schema_version
    name, version = parse_schema_id(values[0])
    expected = topic.message_type.DESCRIPTOR.full_name
    if name != expected:
        raise SchemaError(f"topic {topic.name} expects {expected}, record holds {name}")
    if not topic.accepts(version):
        raise SchemaError(f"{name} schema version {version} is not accepted on {topic.name}")
    return version


class ProtoConsumer(Generic[M]):
    """Consumer-group member over declared topics: decodes values, commits only when told to.

    Typical loop: ``for rec in consumer.poll(): process(rec)`` then ``consumer.commit()``. A crash
    before the commit redelivers the batch (at-least-once).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        group_id: str,
        topics: Sequence[Topic[M]],
        *,
        auto_offset_reset: str = "earliest",
        **overrides: Any,
    ) -> None:
        """Join ``group_id`` subscribed to ``topics`` (the join itself happens on the first poll)."""
        self._topics = {topic.name: topic for topic in topics}
        kwargs = {**settings.consumer_kwargs(group_id, auto_offset_reset=auto_offset_reset), **overrides}
        self._consumer = KafkaConsumer(**kwargs)
        self._consumer.subscribe(list(self._topics))

    @property
    def raw(self) -> Any:
        """The underlying ``KafkaConsumer`` (for lag metrics, seeks, assignment)."""
        return self._consumer

    def poll(self, timeout_ms: int = 1000, max_records: int | None = None) -> list[Polled[M]]:
        """Fetch the next records (possibly none), decoded, in partition order.

        A broker that cannot be reached (restarting, or a network blip) yields no records: the client
        reconnects on the next poll, and nothing was consumed, so nothing is lost by waiting.
        """
        try:
            batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaConnectionError as exc:
            _LOG.warning("broker unreachable, polling again: %s", exc)
            time.sleep(min(timeout_ms, 1000) / 1000)
            return []
        out: list[Polled[M]] = []
        for records in batches.values():
            out.extend(decode_record(self._topics[record.topic], record) for record in records)
        return out

    def commit(self, records: Iterable[ConsumedRecord[Any] | UndecodableRecord] | None = None) -> bool:
        """Commit after processing: everything polled so far, or just up to the given records.

        Returns False (and logs) when the group rebalanced meanwhile: the uncommitted records then
        go to the partitions' new owners, which is the at-least-once contract. Other errors raise.
        """
        offsets = None if records is None else _next_offsets(records)
        if offsets == {}:
            return True  # nothing processed, nothing to commit
        try:
            self._consumer.commit(offsets=offsets)
        except (CommitFailedError, RebalanceInProgressError) as exc:
            _LOG.warning("commit skipped, the group is rebalancing: %s", exc)
            return False
        return True

    def close(self) -> None:
        """Leave the group (without committing: uncommitted work is redelivered)."""
        self._consumer.close(autocommit=False)

    def __enter__(self) -> ProtoConsumer[M]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _next_offsets(records: Iterable[ConsumedRecord[Any] | UndecodableRecord]) -> dict[Any, Any]:
    """``{partition: offset of the next record to read}`` for the highest record of each partition."""
    highest: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        highest[tp] = max(highest.get(tp, -1), record.offset)
    return {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in highest.items()}


# --------------------------------------------------------------------------------------------------
# Topics


def ensure_topics(settings: KafkaSettings, topics: Sequence[Topic[Any]], timeout_ms: int = 30_000) -> None:
    """Create missing topics and check existing ones against their declarations.

    Tolerates concurrent creators ("already exists"). Raises :class:`TopicMismatchError` if an existing
    topic has another partition count (that would break the join by key) or a declared config the
    broker reports with another value.
    """
    admin = KafkaAdminClient(**settings.admin_kwargs())
    try:
        _create_missing(admin, topics, timeout_ms)
        admin.wait_for_topics([topic.name for topic in topics], timeout_ms=timeout_ms)
        _check_partitions(admin, topics)
        _check_configs(admin, topics)
    finally:
        admin.close()


def _create_missing(admin: Any, topics: Sequence[Topic[Any]], timeout_ms: int) -> None:
    existing = set(admin.list_topics())
    missing = {
        topic.name: {
            "num_partitions": topic.partitions,
            "replication_factor": topic.replication_factor,
            "configs": dict(topic.config),
        }
        for topic in topics
        if topic.name not in existing
    }
    if not missing:
        return
    result = admin.create_topics(missing, timeout_ms=timeout_ms, raise_errors=False)
    for entry in result["topics"]:
        code = entry["error_code"]
        if code == 0 or code == TopicAlreadyExistsError.errno:
            continue  # another process won the race: checked below like any existing topic
        raise KafkaError(f"creating topic {entry['name']} failed: error {code} {entry['error_message']}")
    _LOG.info("created topics %s", sorted(missing))


def _check_partitions(admin: Any, topics: Sequence[Topic[Any]]) -> None:
    described = {entry["name"]: entry for entry in admin.describe_topics([t.name for t in topics])}
    for topic in topics:
        actual = len(described[topic.name]["partitions"])
        if actual != topic.partitions:
            raise TopicMismatchError(
                f"topic {topic.name} has {actual} partitions, declared {topic.partitions}"
            )


def _check_configs(admin: Any, topics: Sequence[Topic[Any]]) -> None:
    declared = [topic for topic in topics if topic.config]
    if not declared:
        return
    resources = [ConfigResource(ConfigResourceType.TOPIC, topic.name) for topic in declared]
    reported = admin.describe_configs(resources, config_filter="all").get("topic", {})
    for topic in declared:
        actual = reported.get(topic.name, {})
        for key, value in topic.config.items():
            # A broker that reports nothing for a key cannot be checked; one that reports a
            # different value has a topic created with other settings.
            if key in actual and actual[key]["value"] != value:
                raise TopicMismatchError(
                    f"topic {topic.name}: {key}={actual[key]['value']!r}, declared {value!r}"
                )
