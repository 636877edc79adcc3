"""The adapter follower on a real broker: a replica learns its adapters from the `adapters` topic alone,
and tells its observers (the replica's metrics) about what it loaded, at start-up as well as live."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from services.adapters.events import announce_version, move_alias
from services.adapters.store import AdapterStore
from services.common.kafka_io import ProtoProducer, ensure_topics
from services.common.topics import adapters_topic
from services.policy.adapters import AdapterStats
from services.policy.follower import AdapterFollower
from services.policy.runner import PolicyRunner
from tests.conftest import BrokerFactory
from tests.policy.conftest import PublishAdapter

pytestmark = pytest.mark.integration

Snapshot = tuple[dict[str, str], dict[str, AdapterStats]]


def test_observers_see_what_start_up_loaded_and_every_live_change(
    broker_factory: BrokerFactory,
    tiny_policy_path: Path,
    adapter_store: AdapterStore,
    publish_adapter: PublishAdapter,
) -> None:
    broker = broker_factory()
    first, second = publish_adapter(1), publish_adapter(2)
    ensure_topics(broker.settings(), [adapters_topic()])  # as the admin does before its first event
    with ProtoProducer(broker.settings()) as producer:  # promoted while the replica is still starting
        announce_version(producer, first)
        move_alias(producer, "latest", first.version, reason="before the replica started")
    runner = PolicyRunner(
        str(tiny_policy_path), adapter_store=adapter_store, base_model_id=str(tiny_policy_path)
    )
    seen: list[Snapshot] = []
    changed = threading.Event()

    def on_change() -> None:
        seen.append(runner.adapters.snapshot())
        changed.set()

    follower = AdapterFollower(runner.adapters, broker.settings(), on_change=on_change).start()
    try:
        assert follower.caught_up.wait(60) and changed.wait(10), "no change reported after the catch-up"
        aliases, resident = seen[-1]
        assert aliases["latest"] == first.version and first.version in resident

        changed.clear()
        with ProtoProducer(broker.settings()) as producer:
            announce_version(producer, second)
            move_alias(producer, "latest", second.version, reason="live promotion")
        deadline_s = 60.0
        while seen[-1][0].get("latest") != second.version:
            assert changed.wait(deadline_s), f"latest never moved to {second.version}: {seen[-1][0]}"
            changed.clear()
        assert second.version in seen[-1][1]
    finally:
        follower.stop()
