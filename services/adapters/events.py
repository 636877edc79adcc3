"""Announcing adapter versions and alias moves on the compacted `adapters` topic."""

from __future__ import annotations

import time

from services.common.kafka_io import ProtoProducer
from services.common.topics import adapters_topic
from spr.v1 import adapters_pb2


def version_key(version: str) -> str:
    return f"version/{version}"


def alias_key(alias: str) -> str:
    return f"alias/{alias}"


def announce_version(producer: ProtoProducer, manifest: adapters_pb2.AdapterManifest) -> None:
    """Tell every replica a version exists (they preload it); blocks until the broker has it."""
    event = adapters_pb2.AdapterEvent(published=manifest)
    producer.send_and_wait(adapters_topic(), version_key(manifest.version), event)


def move_alias(producer: ProtoProducer, alias: str, version: str, reason: str) -> adapters_pb2.AliasUpdate:
    """Point `alias` at `version` for every replica; blocks until the broker has it."""
    update = adapters_pb2.AliasUpdate(
        alias=alias, version=version, reason=reason, updated_unix_ms=int(time.time() * 1000)
    )
    producer.send_and_wait(adapters_topic(), alias_key(alias), adapters_pb2.AdapterEvent(alias=update))
    return update
