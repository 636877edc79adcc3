"""The Admin API over a real loopback gRPC server, on a real broker and a real adapter store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from kafka import KafkaConsumer, TopicPartition

from services.adapters.events import announce_version, move_alias
from services.admin.logic import MAX_TRIGGER_REASON
from services.common.errors import error_code_of
from services.common.kafka_io import ProtoProducer, UndecodableRecord, decode_record
from services.common.topics import adapters_topic, trainer_control_topic
from services.devstack.broker import BrokerProcess
from services.devstack.process import free_port
from spr.v1 import adapters_pb2
from tests.admin.conftest import GOOD, AdminHarness, Publish
from tests.admin.test_replicas import TRITON_SAMPLE

pytestmark = pytest.mark.integration

WORSE = {"eval_preference_accuracy": 0.60, "eval_reward_margin": 0.50}
ABOUT_AS_GOOD = {"eval_preference_accuracy": 0.695, "eval_reward_margin": 0.48}


if TYPE_CHECKING:

    class FailedCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]  # the stubs disagree on details()
        """What grpc raises for a failed call: an RpcError that is also the Call."""


def rpc_error(call: Callable[[], Any]) -> FailedCall:
    """Run ``call``, which must fail; return the error."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert isinstance(error, grpc.Call)
    return cast("FailedCall", error)


def topic_events(broker: BrokerProcess) -> list[tuple[str, adapters_pb2.AdapterEvent]]:
    """Every (key, event) on the adapters topic, in order."""
    consumer = KafkaConsumer(**broker.settings().common_kwargs(), group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(adapters_topic().name, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        events = []
        while consumer.position(tp) < end:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    decoded = decode_record(adapters_topic(), record)
                    assert not isinstance(decoded, UndecodableRecord), decoded.reason
                    events.append((decoded.key, decoded.message))
        return events
    finally:
        consumer.close()


class _ReplicaHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = TRITON_SAMPLE.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def replica_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ReplicaHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def test_list_shows_store_versions_topic_aliases_and_replica_loads(
    admin_factory: Callable[..., AdminHarness], broker: BrokerProcess, publish: Publish, replica_url: str
) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/metrics"
    admin = admin_factory(replica_metrics_urls=(replica_url, unreachable))
    empty = admin.stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30)
    assert list(empty.versions) == [] and dict(empty.aliases) == {}

    v1, v2 = publish(1, GOOD), publish(2, GOOD)
    with ProtoProducer(broker.settings()) as producer:  # what the trainer does after publishing
        announce_version(producer, v2)
        move_alias(producer, "latest", v2.version, "trainer")
        move_alias(producer, "stable", v1.version, "trainer")
    listing = admin.stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30)
    assert [m.version for m in listing.versions] == [v1.version, v2.version]
    assert listing.versions[0].metrics["eval_preference_accuracy"] == pytest.approx(0.70)
    assert dict(listing.aliases) == {"latest": v2.version, "stable": v1.version}
    # The sample replica has two versions resident; the unreachable one does not fail the listing.
    assert [(a.version, a.requests_served) for a in listing.loaded] == [
        ("spr-v2-bbbbbbbb", 3),
        ("spr-v3-cccccccc", 5),
    ]
    statuses = admin.core.replica_status()
    assert statuses[1].url == unreachable and statuses[1].error


def test_promote_to_latest_moves_the_alias_on_the_topic(
    admin: AdminHarness, broker: BrokerProcess, publish: Publish
) -> None:
    v1, v2 = publish(1), publish(2)  # latest is not gated: no metrics needed
    first = admin.stub.Promote(adapters_pb2.PromoteRequest(version=v1.version, alias="latest"), timeout=30)
    assert (first.alias.alias, first.alias.version, first.previous_version) == ("latest", v1.version, "")
    second = admin.stub.Promote(
        adapters_pb2.PromoteRequest(version=v2.version, alias="latest", reason="ticket 42"), timeout=30
    )
    assert second.previous_version == v1.version and "ticket 42" in second.alias.reason

    events = topic_events(broker)
    alias_events = [(key, e.alias.version) for key, e in events if e.WhichOneof("event") == "alias"]
    assert alias_events == [("alias/latest", v1.version), ("alias/latest", v2.version)]
    # Versions nobody announced are announced first, so replicas preload them before the switch.
    announced = [key for key, e in events if e.WhichOneof("event") == "published"]
    assert announced == [f"version/{v1.version}", f"version/{v2.version}"]
    assert events[0][0] == f"version/{v1.version}" and events[1][0] == "alias/latest"
    listing = admin.stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30)
    assert listing.aliases["latest"] == v2.version


@pytest.mark.parametrize(
    ("request_fields", "status", "code"),
    [
        ({"version": "spr-v9-00000000", "alias": "latest"}, "NOT_FOUND", "ADAPTER_NOT_IN_STORE"),
        ({"version": "../../etc", "alias": "latest"}, "INVALID_ARGUMENT", "INVALID_REQUEST"),
        ({"version": "", "alias": "latest"}, "INVALID_ARGUMENT", "INVALID_REQUEST"),
        ({"version": "spr-v9-00000000", "alias": "Bad/Alias"}, "INVALID_ARGUMENT", "INVALID_REQUEST"),
    ],
)
def test_promote_refuses_unknown_versions_and_bad_names(
    admin: AdminHarness, request_fields: dict[str, Any], status: str, code: str
) -> None:
    error = rpc_error(lambda: admin.stub.Promote(adapters_pb2.PromoteRequest(**request_fields), timeout=30))
    assert error.code() is getattr(grpc.StatusCode, status)
    assert error_code_of(error) == code


def test_promote_refuses_corrupt_versions_and_other_base_models(
    admin: AdminHarness, publish: Publish
) -> None:
    corrupt = publish(1)
    folder = admin.core.store.path_of(corrupt.version)
    (folder / "adapter_model.safetensors").write_bytes(b"bit rot")
    error = rpc_error(
        lambda: admin.stub.Promote(adapters_pb2.PromoteRequest(version=corrupt.version, alias="latest"))
    )
    assert error.code() is grpc.StatusCode.DATA_LOSS and error_code_of(error) == "ADAPTER_CORRUPT"
    foreign = publish(2, base_model="someone/else")
    error = rpc_error(
        lambda: admin.stub.Promote(adapters_pb2.PromoteRequest(version=foreign.version, alias="latest"))
    )
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_code_of(error) == "ADAPTER_BASE_MISMATCH"


def test_stable_moves_only_through_the_eval_gate_unless_skipped(
    admin: AdminHarness, publish: Publish
) -> None:
    good, worse, close, unevaluated = (
        publish(1, GOOD),
        publish(2, WORSE),
        publish(3, ABOUT_AS_GOOD),
        publish(4),
    )

    def promote(version: str, skip: bool = False) -> adapters_pb2.AliasResponse:
        request = adapters_pb2.PromoteRequest(version=version, alias="stable", skip_eval_gate=skip)
        response: adapters_pb2.AliasResponse = admin.stub.Promote(request, timeout=30)
        return response

    assert "eval gate passed" in promote(good.version).alias.reason  # nothing to compare against yet
    error = rpc_error(lambda: promote(worse.version))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_code_of(error) == "EVAL_GATE_FAILED"
    assert "eval_preference_accuracy 0.6 vs 0.7" in (error.details() or "")
    error = rpc_error(lambda: promote(unevaluated.version))
    assert error_code_of(error) == "EVAL_METRICS_MISSING"
    assert "eval_preference_accuracy" in (error.details() or "")
    listing = admin.stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30)
    assert listing.aliases["stable"] == good.version  # refusals moved nothing

    assert promote(close.version).previous_version == good.version  # within the tolerance
    skipped = promote(worse.version, skip=True)
    assert (skipped.alias.version, skipped.previous_version) == (worse.version, close.version)
    assert "eval gate skipped" in skipped.alias.reason


def test_rollback_returns_to_the_previous_versions(admin: AdminHarness, publish: Publish) -> None:
    versions = [publish(i).version for i in (1, 2, 3)]
    for version in versions:
        admin.stub.Promote(adapters_pb2.PromoteRequest(version=version, alias="latest"), timeout=30)

    def rollback(**fields: str) -> adapters_pb2.AliasResponse:
        response: adapters_pb2.AliasResponse = admin.stub.Rollback(
            adapters_pb2.RollbackRequest(alias="latest", **fields), timeout=30
        )
        return response

    back = rollback(reason="bad outputs")
    assert (back.alias.version, back.previous_version) == (versions[1], versions[2])
    assert back.alias.reason == f"rollback from {versions[2]}: bad outputs"
    assert rollback().alias.version == versions[0]  # further back, not forth again
    error = rpc_error(rollback)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_code_of(error) == "NO_PREVIOUS_VERSION"
    assert rollback(to_version=versions[2]).alias.version == versions[2]  # explicit target
    error = rpc_error(lambda: rollback(to_version="spr-v9-00000000"))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    error = rpc_error(lambda: admin.stub.Rollback(adapters_pb2.RollbackRequest(alias="stable"), timeout=30))
    assert error.code() is grpc.StatusCode.NOT_FOUND and error_code_of(error) == "ALIAS_NOT_FOUND"


def test_a_restarted_admin_rolls_back_from_the_topic_history(
    admin_factory: Callable[..., AdminHarness], publish: Publish
) -> None:
    first = admin_factory()
    v1, v2 = publish(1).version, publish(2).version
    for version in (v1, v2):
        first.stub.Promote(adapters_pb2.PromoteRequest(version=version, alias="latest"), timeout=30)
    second = admin_factory()  # replays the topic from the beginning
    back = second.stub.Rollback(adapters_pb2.RollbackRequest(alias="latest"), timeout=30)
    assert (back.alias.version, back.previous_version) == (v1, v2)


def control_records(broker: BrokerProcess) -> list[tuple[str, adapters_pb2.TrainingTrigger]]:
    """Every (key, trigger) on trainer.control, in order."""
    topic = trainer_control_topic()
    consumer = KafkaConsumer(**broker.settings().common_kwargs(), group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic.name, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        out = []
        while consumer.position(tp) < end:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    decoded = decode_record(topic, record)
                    assert not isinstance(decoded, UndecodableRecord), decoded.reason
                    out.append((decoded.key, decoded.message))
        return out
    finally:
        consumer.close()


def test_trigger_training_queues_an_on_demand_request(admin: AdminHarness, broker: BrokerProcess) -> None:
    before = int(time.time() * 1000)
    first = admin.stub.TriggerTraining(adapters_pb2.TriggerTrainingRequest(reason="new data"), timeout=30)
    second = admin.stub.TriggerTraining(adapters_pb2.TriggerTrainingRequest(), timeout=30)
    assert first.accepted and second.accepted and first.trigger_id != second.trigger_id
    assert "trainer.control" in first.message
    (key1, queued1), (key2, queued2) = control_records(broker)
    assert (key1, key2) == (first.trigger_id, second.trigger_id)
    assert queued1.trigger_id == first.trigger_id and queued1.reason == "new data"
    assert queued1.kind == adapters_pb2.TRIGGER_KIND_ON_DEMAND and queued1.requested_unix_ms >= before
    assert queued2.reason  # a default reason, never empty lineage


def test_trigger_training_refuses_an_oversized_reason(admin: AdminHarness, broker: BrokerProcess) -> None:
    request = adapters_pb2.TriggerTrainingRequest(reason="x" * (MAX_TRIGGER_REASON + 1))
    error = rpc_error(lambda: admin.stub.TriggerTraining(request, timeout=30))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_code_of(error) == "INVALID_REQUEST"


@pytest.mark.parametrize("connected_before", [True, False], ids=["connected", "never-connected"])
def test_broker_down_is_unavailable_and_the_service_recovers(
    admin_factory: Callable[..., AdminHarness],
    broker: BrokerProcess,
    publish: Publish,
    connected_before: bool,
) -> None:
    admin = admin_factory(kafka_request_timeout_ms=1500, topic_sync_timeout_s=3.0)
    version = publish(1).version
    if connected_before:
        admin.stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30)
        admin.stub.GetPipelineStats(adapters_pb2.PipelineStatsRequest(), timeout=30)
    broker.stop()
    started = time.monotonic()
    calls: list[Callable[[], Any]] = [
        lambda: admin.stub.Promote(adapters_pb2.PromoteRequest(version=version, alias="latest"), timeout=60),
        lambda: admin.stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=60),
        lambda: admin.stub.GetPipelineStats(adapters_pb2.PipelineStatsRequest(), timeout=60),
    ]
    for call in calls:
        error = rpc_error(call)
        assert error.code() is grpc.StatusCode.UNAVAILABLE, error.details()
        assert error_code_of(error) == "UPSTREAM_UNAVAILABLE"
    assert time.monotonic() - started < 30
    broker.start()
    response = admin.stub.Promote(adapters_pb2.PromoteRequest(version=version, alias="latest"), timeout=60)
    assert response.alias.version == version
    assert admin.stub.GetPipelineStats(adapters_pb2.PipelineStatsRequest(), timeout=60).stages
