"""BrokerProcess: readiness, stop by PID, restart keeping noida's data, crash, start-up failures."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from kafka import TopicPartition

from services.common.kafka_io import ProtoConsumer, ProtoProducer, Topic, ensure_topics
from services.devstack.broker import BrokerImpl, BrokerProcess, client_settings, kafka_round_trip
from services.devstack.process import StartupError, pid_alive, port_is_open
from spr.v1 import common_pb2

pytestmark = pytest.mark.integration

BrokerFactory = Callable[..., BrokerProcess]
REGIONS = Topic("regions", common_pb2.Region, partitions=2)


def produce_and_commit(broker: BrokerProcess, count: int, consume: int) -> None:
    settings = broker.settings()
    ensure_topics(settings, [REGIONS])
    with ProtoProducer(settings) as producer:
        for i in range(count):
            producer.send(REGIONS, f"region-{i}", common_pb2.Region(region_id=f"region-{i}"))
    with ProtoConsumer(settings, "restart-group", [REGIONS]) as consumer:
        got: list[Any] = []
        while len(got) < consume:
            got.extend(consumer.poll(timeout_ms=500, max_records=consume - len(got)))
        assert consumer.commit()


def stored_state(broker: BrokerProcess) -> tuple[dict[int, int], dict[int, int]]:
    """(end offset, committed offset) per partition of REGIONS."""
    with ProtoConsumer(broker.settings(), "restart-group", [REGIONS]) as consumer:
        tps = [TopicPartition(REGIONS.name, p) for p in range(REGIONS.partitions)]
        ends = consumer.raw.end_offsets(tps)
        return (
            {tp.partition: ends[tp] for tp in tps},
            {tp.partition: consumer.raw.committed(tp) or 0 for tp in tps},
        )


@pytest.mark.parametrize("impl", list(BrokerImpl))
def test_start_is_ready_on_loopback_and_stop_frees_pid_and_port(
    impl: BrokerImpl, broker_factory: BrokerFactory
) -> None:
    broker = broker_factory(impl)
    pid, port = broker.pid, broker.port
    assert pid is not None and pid_alive(pid)
    assert broker.bootstrap_servers == f"127.0.0.1:{port}"
    assert kafka_round_trip(broker.settings())
    assert broker.log_path.exists()
    broker.stop()
    assert not pid_alive(pid)
    assert not port_is_open("127.0.0.1", port)
    broker.stop()  # idempotent


def test_noida_keeps_records_and_offsets_across_restart(broker_factory: BrokerFactory) -> None:
    broker = broker_factory(BrokerImpl.NOIDA)
    produce_and_commit(broker, count=30, consume=12)
    before = stored_state(broker)
    old_pid, port = broker.pid, broker.port
    broker.restart()
    assert broker.pid != old_pid and broker.port == port
    assert stored_state(broker) == before
    assert sum(before[0].values()) == 30 and sum(before[1].values()) == 12


def test_noida_keeps_data_after_a_crash_once_it_has_saved(broker_factory: BrokerFactory) -> None:
    # noida snapshots its state asynchronously (well under a second after a change); a SIGKILL
    # right after an acknowledged write can lose it. Fault tests must allow for that window.
    broker = broker_factory(BrokerImpl.NOIDA)
    produce_and_commit(broker, count=10, consume=4)
    before = stored_state(broker)
    time.sleep(1.5)
    broker.kill()
    broker.start()
    assert stored_state(broker) == before


def test_tansu_restart_starts_empty(broker_factory: BrokerFactory) -> None:
    broker = broker_factory(BrokerImpl.TANSU)
    assert not broker.persistent
    produce_and_commit(broker, count=5, consume=1)
    broker.restart()
    with ProtoConsumer(broker.settings(), "probe", [REGIONS]) as consumer:
        assert REGIONS.name not in consumer.raw.topics()


def test_a_taken_port_fails_fast_with_the_log_tail(broker_factory: BrokerFactory) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(StartupError, match="did not become ready"):
            broker_factory(BrokerImpl.NOIDA, port=port, startup_timeout=15.0)
        assert time.monotonic() - started < 15.0  # the dead process ends the wait, not the timeout


def test_client_settings_hold_each_brokers_quirks() -> None:
    noida = client_settings("noida", "127.0.0.1:1")
    tansu = client_settings("tansu", "127.0.0.1:1")
    assert noida.api_version == (2, 0) and tansu.api_version is None
    assert noida.session_timeout_ms == tansu.session_timeout_ms == 6_000
