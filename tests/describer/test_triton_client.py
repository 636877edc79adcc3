"""The Triton client without a Triton: tensors, error mapping, retries and deadlines on a dead port."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from services.describer import metrics
from services.describer.errors import (
    AdapterNotFound,
    PolicyFailed,
    PolicyRejected,
    PolicyTimeout,
    PolicyUnavailable,
    RequestCancelled,
)
from services.describer.settings import RetryPolicy
from services.describer.triton_client import (
    PolicyRequest,
    Sampling,
    TritonPolicyClient,
    build_inputs,
    map_triton_error,
    parse_outputs,
)
from services.devstack.process import free_port

REQUEST = PolicyRequest(
    image=b"\x89PNG fake",
    instruction="Describe this image.",
    sampling=Sampling(num_samples=3, temperature=0.8, top_p=0.9, max_new_tokens=16),
    adapter="latest",
)


@pytest.mark.parametrize(
    ("message", "status", "expected", "grpc_status"),
    [
        ("ADAPTER_NOT_FOUND: unknown adapter 'x'", "StatusCode.INTERNAL", AdapterNotFound, "NOT_FOUND"),
        (
            "INVALID_ARGUMENT: IMAGE is not a decodable image",
            "StatusCode.INTERNAL",
            PolicyRejected,
            "INVALID_ARGUMENT",
        ),
        (
            "Failed to process the request(s) for model 'spr_policy_0_0', message: ADAPTER_NOT_FOUND: gone",
            "StatusCode.INTERNAL",
            AdapterNotFound,
            "NOT_FOUND",
        ),
        ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", PolicyUnavailable, "UNAVAILABLE"),
        ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", PolicyTimeout, "DEADLINE_EXCEEDED"),
        ("Locally cancelled", "StatusCode.CANCELLED", RequestCancelled, "CANCELLED"),
        (
            "unexpected shape for input 'IMAGE'",
            "StatusCode.INVALID_ARGUMENT",
            PolicyRejected,
            "INVALID_ARGUMENT",
        ),
        ("CUDA out of memory", "StatusCode.INTERNAL", PolicyFailed, "UNAVAILABLE"),
        ("SOMETHING_ELSE: with an unknown code", "StatusCode.INTERNAL", PolicyFailed, "UNAVAILABLE"),
        (None, None, PolicyFailed, "UNAVAILABLE"),
    ],
)
def test_triton_errors_map_to_typed_errors(
    message: str | None, status: str | None, expected: type, grpc_status: str
) -> None:
    error = map_triton_error(InferenceServerException(msg=message, status=status))
    assert type(error) is expected
    assert error.status is getattr(grpc.StatusCode, grpc_status)
    if message and message.startswith("ADAPTER_NOT_FOUND: "):
        assert error.message == "policy model: unknown adapter 'x'"  # the code prefix is not repeated


def test_tensors_have_the_batch_axis_and_the_config_dtypes() -> None:
    inputs = {t.name(): t for t in build_inputs(REQUEST)}
    assert set(inputs) == {
        "IMAGE",
        "INSTRUCTION",
        "NUM_SAMPLES",
        "TEMPERATURE",
        "TOP_P",
        "MAX_NEW_TOKENS",
        "GREEDY",
        "ADAPTER",
    }  # no SEED: unseeded
    assert inputs["IMAGE"].shape() == [1, len(REQUEST.image)]
    assert inputs["IMAGE"].datatype() == "UINT8"
    assert {name: t.datatype() for name, t in inputs.items() if name != "IMAGE"} == {
        "INSTRUCTION": "BYTES",
        "NUM_SAMPLES": "INT32",
        "TEMPERATURE": "FP32",
        "TOP_P": "FP32",
        "MAX_NEW_TOKENS": "INT32",
        "GREEDY": "BOOL",
        "ADAPTER": "BYTES",
    }
    assert all(t.shape() == [1, 1] for name, t in inputs.items() if name != "IMAGE")
    seeded = PolicyRequest(REQUEST.image, "x", Sampling(1, 1.0, 1.0, 1, seed=7))
    assert {t.name(): t.datatype() for t in build_inputs(seeded)}["SEED"] == "INT64"


def _dead_client(**retry: Any) -> TritonPolicyClient:
    """A client of a port nobody listens on (connection refused at once)."""
    return TritonPolicyClient(f"127.0.0.1:{free_port()}", retry=RetryPolicy(**retry))


def test_unreachable_triton_is_retried_with_backoff_then_unavailable() -> None:
    client = _dead_client(max_attempts=3, initial_backoff_s=0.1, multiplier=2.0, jitter=0.0)
    retries_before = metrics.TRITON_RETRIES._value.get()
    started = time.monotonic()
    with pytest.raises(PolicyUnavailable):
        asyncio.run(client.generate(REQUEST, deadline=time.monotonic() + 10))
    elapsed = time.monotonic() - started
    assert metrics.TRITON_RETRIES._value.get() - retries_before == 2
    assert 0.3 <= elapsed < 3.0  # waited 0.1 + 0.2 s between the three attempts


def test_retries_never_wait_past_the_deadline() -> None:
    client = _dead_client(max_attempts=10, initial_backoff_s=5.0, jitter=0.0)
    started = time.monotonic()
    with pytest.raises(PolicyUnavailable):  # the cause stays visible: Triton is down, not slow
        asyncio.run(client.generate(REQUEST, deadline=time.monotonic() + 1.0))
    assert time.monotonic() - started < 1.0


def test_an_expired_deadline_is_a_timeout() -> None:
    with pytest.raises(PolicyTimeout):
        asyncio.run(_dead_client().generate(REQUEST, deadline=time.monotonic() - 0.1))


def test_is_ready_is_false_when_triton_is_down() -> None:
    async def check() -> bool:
        client = _dead_client()
        try:
            return await client.is_ready(timeout=1.0)
        finally:
            await client.close()

    assert asyncio.run(check()) is False


def _infer_result(arrays: dict[str, tuple[npt.NDArray[Any], str]]) -> InferResult:
    """A real tritonclient InferResult, built from the wire message Triton sends."""
    response = service_pb2.ModelInferResponse(model_name="spr_policy")
    for name, (array, datatype) in arrays.items():
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        raw = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
        response.raw_output_contents.append(raw)
    return InferResult(response)


def test_outputs_are_trimmed_to_each_samples_token_count() -> None:
    result = _infer_result(
        {
            "TEXT": (np.array([[b"a dog", "caf\u00e9".encode()]], dtype=np.object_), "BYTES"),
            "TOKEN_LOGPROBS": (np.array([[[-0.1, -0.2, 0.0], [-0.3, -0.4, -0.5]]], dtype=np.float32), "FP32"),
            "NUM_TOKENS": (np.array([[2, 3]], dtype=np.int32), "INT32"),
            "ADAPTER_VERSION": (np.array([[b"spr-v1-abc"]], dtype=np.object_), "BYTES"),
        }
    )
    output = parse_outputs(result)
    assert output.texts == ["a dog", "caf\u00e9"]
    assert output.token_logprobs == [pytest.approx([-0.1, -0.2]), pytest.approx([-0.3, -0.4, -0.5])]
    assert output.adapter_version == "spr-v1-abc"
    with pytest.raises(PolicyFailed, match="no TEXT"):
        parse_outputs(_infer_result({}))
