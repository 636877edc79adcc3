"""The Describer over gRPC with the tiny policy on the real tritonserver (python backend, CPU).

The describer tests' private Triton (``triton`` fixture; the outage test stops and restarts it) and one
Describer server in front of it, configured the way one-machine mode configures it (pixel bounds from
the tiny model's processor config).
"""

from __future__ import annotations

import concurrent.futures
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.common.errors import error_code_of
from services.common.grpc_server import GrpcServer, build_server, health_status, make_channel
from services.describer.logic import Describer
from services.describer.servicer import register_with
from services.devstack.triton import TritonServer
from spr.v1 import common_pb2, describer_pb2, describer_pb2_grpc
from tests.describer.conftest import scene_png
from tests.describer.test_logic import REGION, make_settings

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def describer_server(triton: TritonServer, tiny_qwen25: Path) -> Iterator[GrpcServer]:
    settings = make_settings(
        triton_url=triton.grpc_url,
        processor_config=tiny_qwen25 / "processor_config.json",
        policy_model_id="tiny-qwen2.5-vl",
        sampling={"max_new_tokens": MAX_NEW_TOKENS},
        # Recovery after a Triton restart: the channel retries the connection every 0.3 s, and the
        # 0.1 + 0.2 + 0.4 s of backoff between four attempts outlast that.
        retry={"max_attempts": 4, "initial_backoff_s": 0.1, "jitter": 0.0},
        triton_reconnect_backoff_s=0.3,
        grace_period_s=0.0,
        max_workers=8,
    )
    describer = Describer(settings)
    server = build_server(settings, register_with(describer))
    server.start()
    yield server
    server.stop(grace=0)
    describer.close()


@pytest.fixture(scope="module")
def stub(describer_server: GrpcServer) -> Iterator[describer_pb2_grpc.DescriberStub]:
    with make_channel(f"127.0.0.1:{describer_server.port}") as channel:
        yield describer_pb2_grpc.DescriberStub(channel)


def describe(
    stub: describer_pb2_grpc.DescriberStub, timeout: float = 60.0, **fields: Any
) -> list[describer_pb2.DescribeRegionResponse]:
    values: dict[str, Any] = {"image_bytes": scene_png(), "region": REGION, "region_id": "it-region"}
    values.update(fields)
    return list(stub.DescribeRegion(describer_pb2.DescribeRegionRequest(**values), timeout=timeout))


def test_a_region_is_described_n_times(stub: describer_pb2_grpc.DescriberStub) -> None:
    responses = describe(stub, sampling=common_pb2.SamplingParams(num_samples=4, temperature=0.9))
    assert len(responses) == 4
    assert [r.candidate.sample_index for r in responses] == [0, 1, 2, 3]
    assert len({r.candidate.candidate_id for r in responses}) == 4
    for response in responses:
        candidate = response.candidate
        assert candidate.coordinate_format == "qwen25_json"
        assert 0 < len(candidate.token_logprobs) <= MAX_NEW_TOKENS
        assert all(lp <= 0.0 for lp in candidate.token_logprobs)
        for (
            mention
        ) in candidate.mentions:  # random weights rarely write boxes; any that parse are in the image
            if mention.has_box:
                assert (
                    0 <= mention.box.x1 <= mention.box.x2 <= 200
                    and 0 <= mention.box.y1 <= mention.box.y2 <= 150
                )
        lineage = response.lineage
        assert lineage.adapter_version == ""  # the base model produced it
        assert lineage.prompt_template_id == "qwen25-vl/crop/v1"
        assert lineage.policy_model_id == "tiny-qwen2.5-vl"


def test_every_prompt_mode_goes_through(stub: describer_pb2_grpc.DescriberStub) -> None:
    refs = [common_pb2.AnnotatedObject(category="red circle", box=REGION)]
    for mode, template in [
        (describer_pb2.PROMPT_MODE_CROP_WITH_REFS, "qwen25-vl/crop-refs/v1"),
        (describer_pb2.PROMPT_MODE_FULL_IMAGE_BOX, "qwen25-vl/full-box/v1"),
    ]:
        responses = describe(
            stub, prompt_mode=mode, object_refs=refs, sampling=common_pb2.SamplingParams(num_samples=2)
        )
        assert len(responses) == 2
        assert {r.lineage.prompt_template_id for r in responses} == {template}


def test_greedy_decoding_is_deterministic(stub: describer_pb2_grpc.DescriberStub) -> None:
    sampling = common_pb2.SamplingParams(num_samples=2, greedy=True)
    first = [r.candidate.text for r in describe(stub, sampling=sampling)]
    again = [r.candidate.text for r in describe(stub, sampling=sampling)]
    assert first == again and first[0] == first[1]


def test_concurrent_requests_all_succeed(stub: describer_pb2_grpc.DescriberStub) -> None:
    sampling = common_pb2.SamplingParams(num_samples=3)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: describe(stub, sampling=sampling, region_id=f"c{i}"), range(6)))
    assert [len(r) for r in results] == [3] * 6


def test_unknown_adapter_is_not_found(stub: describer_pb2_grpc.DescriberStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        describe(stub, adapter="spr-v999-doesnotexist", sampling=common_pb2.SamplingParams(num_samples=1))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_code_of(caught.value) == "ADAPTER_NOT_FOUND"


def triton_requests(triton: TritonServer) -> float:
    """Requests spr_policy received (succeeded or failed), from Triton's own metrics."""
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as response:
        text = response.read().decode()
    pattern = re.compile(
        r'^nv_inference_request_(?:success|failure)\{[^}]*model="spr_policy"[^}]*\} (\S+)$', re.M
    )
    return sum(float(value) for value in pattern.findall(text))


def test_bad_inputs_never_reach_triton(triton: TritonServer, stub: describer_pb2_grpc.DescriberStub) -> None:
    bad: list[dict[str, Any]] = [
        {"image_bytes": b"\x89PNG\r\n\x1a\n corrupt"},
        {"region": common_pb2.Box(x1=0, y1=0, x2=500, y2=50)},
        {"sampling": common_pb2.SamplingParams(num_samples=64)},
    ]
    before = triton_requests(triton)
    for fields in bad:
        with pytest.raises(grpc.RpcError) as caught:
            describe(stub, **fields)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert triton_requests(triton) == before > 0


def test_triton_outage_is_unavailable_and_the_service_recovers(
    triton: TritonServer,
    describer_server: GrpcServer,
    stub: describer_pb2_grpc.DescriberStub,
    tiny_qwen25: Path,
) -> None:
    """Last in the module: stops the private Triton, then starts it again on the same ports."""
    triton.stop()
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            describe(stub, sampling=common_pb2.SamplingParams(num_samples=1))
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error_code_of(caught.value) == "POLICY_UNAVAILABLE"
        assert time.monotonic() - started < 5.0  # four attempts with short backoff, not a hang
        with make_channel(f"127.0.0.1:{describer_server.port}") as channel:
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SPR_POLICY_MODEL_PATH", str(tiny_qwen25))
            triton.start()
    assert len(describe(stub, sampling=common_pb2.SamplingParams(num_samples=2))) == 2
