"""The shared gRPC bootstrap, over real loopback sockets (test servicers: tests/common/servicers.py)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from services.common.errors import error_code_of
from services.common.grpc_server import GrpcServer, health_status
from spr.v1 import adapters_pb2, adapters_pb2_grpc, common_pb2, describer_pb2, describer_pb2_grpc

StartServer = Callable[..., GrpcServer]
ChannelTo = Callable[..., grpc.Channel]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN = "test-token-0123456789abcdef"
SKEW = 0.1


def _admin(channel: grpc.Channel) -> adapters_pb2_grpc.AdminStub:
    return adapters_pb2_grpc.AdminStub(channel)


def _promote(channel: grpc.Channel, version: str) -> adapters_pb2.AliasResponse:
    return _admin(channel).Promote(adapters_pb2.PromoteRequest(version=version), timeout=10)


def _status(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def _health(channel: grpc.Channel, service: str) -> int:
    return health_status(channel, service, timeout=5)


# --- health, reflection, shutdown ------------------------------------------------------------------


def test_health_serving_then_not_serving_on_shutdown(
    start_server: StartServer, channel_to: ChannelTo
) -> None:
    server = start_server(shutdown_delay_s=2.0)
    channel = channel_to(server)
    assert _health(channel, "") == SERVING
    assert _health(channel, "spr.v1.Admin") == SERVING
    assert _health(channel, "spr.v1.Describer") == SERVING

    stopper = threading.Thread(target=server.stop)
    stopper.start()
    # During shutdown_delay_s the server still answers, but health says NOT_SERVING.
    deadline = time.monotonic() + 1.5
    while _health(channel, "spr.v1.Admin") != NOT_SERVING:
        assert time.monotonic() < deadline, "health never turned NOT_SERVING"
        time.sleep(0.02)
    assert _health(channel, "") == NOT_SERVING
    assert _promote(channel, "ok").previous_version == ""  # still serving while draining
    stopper.join(timeout=5)
    assert server.wait_for_termination(timeout=1)
    assert _status(lambda: _health(channel, "")).code() == grpc.StatusCode.UNAVAILABLE


def test_reflection_lists_services_and_their_descriptors(
    start_server: StartServer, channel_to: ChannelTo
) -> None:
    channel = channel_to(start_server())
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"spr.v1.Admin", "spr.v1.Describer", "grpc.health.v1.Health"} <= services
    pool = descriptor_pool.DescriptorPool(database)
    admin = pool.FindServiceByName("spr.v1.Admin")
    assert "Promote" in admin.methods_by_name


def test_reflection_can_be_disabled(start_server: StartServer, channel_to: ChannelTo) -> None:
    channel = channel_to(start_server(reflection=False))
    error = _status(lambda: ProtoReflectionDescriptorDatabase(channel).get_services())
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# --- errors, message size, deadlines ----------------------------------------------------------------


def test_handler_exception_is_internal_and_server_survives(
    start_server: StartServer, channel_to: ChannelTo
) -> None:
    channel = channel_to(start_server())
    for _ in range(3):
        error = _status(lambda: _promote(channel, "boom"))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert "RuntimeError" in (error.details() or "")
        assert "error id" in (error.details() or "")
        assert "/etc/private" not in (error.details() or "")  # exception text stays in the server log
    assert _promote(channel, "ok") == adapters_pb2.AliasResponse()


def test_typed_error_maps_to_its_status_and_code(start_server: StartServer, channel_to: ChannelTo) -> None:
    channel = channel_to(start_server())
    error = _status(lambda: _promote(channel, "bad-image"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_code_of(error) == "IMAGE_UNDECODABLE"
    assert (error.details() or "").startswith("IMAGE_UNDECODABLE: ")
    aborted = _status(lambda: _promote(channel, "abort"))
    assert aborted.code() == grpc.StatusCode.NOT_FOUND
    assert aborted.details() == "no such adapter"


def test_oversize_message_is_resource_exhausted(start_server: StartServer, channel_to: ChannelTo) -> None:
    channel = channel_to(start_server(max_message_bytes=64 * 1024))
    big = adapters_pb2.PromoteRequest(version="ok", reason="x" * 100_000)
    error = _status(lambda: _admin(channel).Promote(big, timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    small = adapters_pb2.PromoteRequest(version="ok", reason="x" * 1000)
    assert _admin(channel).Promote(small, timeout=10).previous_version == "x" * 16


def _seen_time_remaining(channel: grpc.Channel, timeout: float | None) -> float:
    response = _admin(channel).ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=timeout)
    return float(response.aliases["time_remaining"])


def test_default_deadline_applied_and_client_deadline_kept(
    start_server: StartServer, channel_to: ChannelTo
) -> None:
    channel = channel_to(start_server(default_deadline_s=2.5, max_deadline_s=20.0))
    # SKEW: grpc's server-side deadline is converted between clocks and can read ~10 ms long.
    assert 1.5 < _seen_time_remaining(channel, timeout=None) <= 2.5  # no client deadline: the default
    assert 0.0 < _seen_time_remaining(channel, timeout=1.0) <= 1.0 + SKEW  # a shorter client deadline wins
    assert 10.0 < _seen_time_remaining(channel, timeout=15.0) <= 15.0 + SKEW  # a longer one too, up to max
    assert 15.0 < _seen_time_remaining(channel, timeout=3600.0) <= 20.0  # capped to max_deadline_s


def test_deadline_policy_reject(start_server: StartServer, channel_to: ChannelTo) -> None:
    channel = channel_to(start_server(default_deadline_s=2.0, max_deadline_s=5.0, deadline_policy="reject"))
    error = _status(lambda: _seen_time_remaining(channel, timeout=3600.0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "deadline" in (error.details() or "")
    assert _seen_time_remaining(channel, timeout=4.0) <= 4.0 + SKEW


def test_handler_overrunning_default_deadline_gets_deadline_exceeded(
    start_server: StartServer, channel_to: ChannelTo
) -> None:
    channel = channel_to(start_server(default_deadline_s=0.3, max_deadline_s=1.0))
    error = _status(lambda: _admin(channel).Promote(adapters_pb2.PromoteRequest(version="sleep:0.5")))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# --- streaming ---------------------------------------------------------------------------------------


def _describe(
    channel: grpc.Channel, n: int, region_id: str = "r1"
) -> list[describer_pb2.DescribeRegionResponse]:
    request = describer_pb2.DescribeRegionRequest(
        region=common_pb2.Box(x1=0, y1=0, x2=4, y2=4),
        sampling=common_pb2.SamplingParams(num_samples=n),
        region_id=region_id,
    )
    return list(describer_pb2_grpc.DescriberStub(channel).DescribeRegion(request, timeout=10))


def test_server_streaming_passes_through_and_errors_become_internal(
    start_server: StartServer, channel_to: ChannelTo
) -> None:
    channel = channel_to(start_server())
    assert [r.candidate.sample_index for r in _describe(channel, 3)] == [0, 1, 2]
    error = _status(lambda: _describe(channel, 3, region_id="boom"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "ValueError" in (error.details() or "")


# --- metrics -----------------------------------------------------------------------------------------


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _labels(method: str, code: str, rpc_type: str = "unary", **extra: str) -> frozenset[tuple[str, str]]:
    service, name = method.split("/")
    return frozenset(
        {
            "grpc_service": service,
            "grpc_method": name,
            "grpc_type": rpc_type,
            "grpc_code": code,
            **extra,
        }.items()
    )


def test_metrics_endpoint_serves_latency_histogram_with_labels(
    start_server: StartServer, channel_to: ChannelTo
) -> None:
    server = start_server()
    assert server.metrics_port is not None
    channel = channel_to(server)
    before = _scrape(server.metrics_port)
    _promote(channel, "ok")
    _status(lambda: _promote(channel, "boom"))
    _status(lambda: _promote(channel, "bad-image"))
    _describe(channel, 2)
    after = _scrape(server.metrics_port)

    def delta(name: str, labels: frozenset[tuple[str, str]]) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    ok = _labels("spr.v1.Admin/Promote", "OK")
    assert delta("spr_grpc_server_handling_seconds_count", ok) == 1
    assert delta("spr_grpc_server_handling_seconds_bucket", ok | {("le", "+Inf")}) == 1
    assert delta("spr_grpc_server_handled_total", ok) == 1
    assert delta("spr_grpc_server_handled_total", _labels("spr.v1.Admin/Promote", "INTERNAL")) == 1
    assert delta("spr_grpc_server_handled_total", _labels("spr.v1.Admin/Promote", "INVALID_ARGUMENT")) == 1
    stream = _labels("spr.v1.Describer/DescribeRegion", "OK", rpc_type="server_stream")
    assert delta("spr_grpc_server_handling_seconds_count", stream) == 1
    errors = frozenset({"component": "commontest", "code": "IMAGE_UNDECODABLE"}.items())
    assert delta("spr_errors_total", errors) == 1
    in_flight = frozenset(
        {"grpc_service": "spr.v1.Admin", "grpc_method": "Promote", "grpc_type": "unary"}.items()
    )
    assert after[("spr_grpc_server_in_flight", in_flight)] == 0
    # Health probes are exempt: no series for them.
    assert not any(dict(labels).get("grpc_service") == "grpc.health.v1.Health" for _, labels in after)


# --- auth and TLS ------------------------------------------------------------------------------------


def test_bearer_token_required_when_configured(start_server: StartServer, channel_to: ChannelTo) -> None:
    server = start_server(auth_tokens=TOKEN)
    missing = _status(lambda: _promote(channel_to(server), "ok"))
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = _status(lambda: _promote(channel_to(server, token="wrong-token-0123456789"), "ok"))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _promote(channel_to(server, token=TOKEN), "ok") == adapters_pb2.AliasResponse()
    # Probes carry no token: health stays open.
    assert _health(channel_to(server), "spr.v1.Admin") == SERVING


def test_tls(start_server: StartServer, channel_to: ChannelTo, pki: object) -> None:
    from tests.common.certs import Pki

    assert isinstance(pki, Pki)
    server = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key)
    assert _promote(channel_to(server, ca_cert=pki.ca), "ok") == adapters_pb2.AliasResponse()
    plaintext = _status(lambda: _promote(channel_to(server), "ok"))
    assert plaintext.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(start_server: StartServer, channel_to: ChannelTo, pki: object) -> None:
    from tests.common.certs import Pki

    assert isinstance(pki, Pki)
    server = start_server(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca, auth_tokens=TOKEN
    )
    good = channel_to(
        server, ca_cert=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key, token=TOKEN
    )
    assert _promote(good, "ok") == adapters_pb2.AliasResponse()
    no_cert = _status(lambda: _promote(channel_to(server, ca_cert=pki.ca, token=TOKEN), "ok"))
    assert no_cert.code() == grpc.StatusCode.UNAVAILABLE
    rogue = channel_to(
        server,
        ca_cert=pki.ca,
        client_cert=pki.rogue_client_cert,
        client_key=pki.rogue_client_key,
        token=TOKEN,
    )
    assert _status(lambda: _promote(rogue, "ok")).code() == grpc.StatusCode.UNAVAILABLE
