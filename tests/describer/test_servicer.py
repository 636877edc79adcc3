"""The Describer over a real loopback gRPC server, with Triton unreachable: every bad input gets its
status and error code, a Triton outage is UNAVAILABLE, and the service keeps serving throughout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.common.errors import error_code_of
from services.common.grpc_server import GrpcServer, build_server, health_status, make_channel
from services.describer.logic import Describer
from services.describer.servicer import register_with
from spr.v1 import common_pb2, describer_pb2, describer_pb2_grpc
from tests.describer.conftest import scene_png
from tests.describer.test_logic import REGION, _bomb_png, make_settings


@pytest.fixture(scope="module")
def server() -> Iterator[GrpcServer]:
    settings = make_settings(
        grace_period_s=0.0, max_workers=4, retry={"max_attempts": 3, "initial_backoff_s": 0.05}
    )
    describer = Describer(settings)
    grpc_server = build_server(settings, register_with(describer))
    grpc_server.start()
    yield grpc_server
    grpc_server.stop(grace=0)
    describer.close()


@pytest.fixture(scope="module")
def channel(server: GrpcServer) -> Iterator[grpc.Channel]:
    with make_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def call(
    channel: grpc.Channel, timeout: float = 10.0, **fields: Any
) -> list[describer_pb2.DescribeRegionResponse]:
    values: dict[str, Any] = {"image_bytes": scene_png(), "region": REGION}
    values.update(fields)
    stub = describer_pb2_grpc.DescriberStub(channel)
    return list(stub.DescribeRegion(describer_pb2.DescribeRegionRequest(**values), timeout=timeout))


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"image_bytes": b"GIF89a broken"}, "INVALID_ARGUMENT", "IMAGE_UNDECODABLE"),
        ({"image_bytes": _bomb_png(60_000, 60_000)}, "RESOURCE_EXHAUSTED", "IMAGE_TOO_MANY_PIXELS"),
        ({"region": common_pb2.Box(x1=-30, y1=0, x2=50, y2=50)}, "INVALID_ARGUMENT", "REGION_OUT_OF_BOUNDS"),
        ({"sampling": common_pb2.SamplingParams(num_samples=1000)}, "INVALID_ARGUMENT", "TOO_MANY_SAMPLES"),
        ({"template_id": "qwen25-vl/crop/v99"}, "INVALID_ARGUMENT", "TEMPLATE_UNKNOWN"),
        ({"image_uri": "/nonexistent.png"}, "NOT_FOUND", "IMAGE_NOT_FOUND"),
        ({}, "UNAVAILABLE", "POLICY_UNAVAILABLE"),  # a valid request, but Triton is down
    ],
    ids=lambda v: v if isinstance(v, str) and v.isupper() and "_" in v else None,
)
def test_each_failure_has_its_status_and_code(
    channel: grpc.Channel, fields: dict[str, Any], status: str, code: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, **fields)
    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() is getattr(grpc.StatusCode, status)
    assert error_code_of(error) == code
    assert (error.details() or "").startswith(f"{code}: ")


def test_the_service_stays_up_after_failures(server: GrpcServer, channel: grpc.Channel) -> None:
    bad: list[dict[str, Any]] = [{"image_bytes": b"junk"}, {}]
    for fields in bad:
        with pytest.raises(grpc.RpcError):
            call(channel, **fields)
    assert health_status(channel, "spr.v1.Describer") == health_pb2.HealthCheckResponse.SERVING
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_the_client_deadline_bounds_the_retries() -> None:
    """With a 5 s backoff and a 1 s deadline, the server gives up at once and says why (UNAVAILABLE);
    without the deadline reaching the Triton client it would sleep and the client see DEADLINE_EXCEEDED."""
    settings = make_settings(grace_period_s=0.0, retry={"max_attempts": 5, "initial_backoff_s": 5.0})
    describer = Describer(settings)
    server = build_server(settings, register_with(describer))
    server.start()
    try:
        with make_channel(f"127.0.0.1:{server.port}") as channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                call(channel, timeout=1.0)
            assert time.monotonic() - started < 0.9
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)
        describer.close()
