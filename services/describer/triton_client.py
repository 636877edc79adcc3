"""Async client of the ``spr_policy`` Triton model (``tritonclient.grpc.aio``).

Tensors follow ``services/policy/model_repository/spr_policy/config.pbtxt``: ``max_batch_size > 0``
gives every tensor a leading batch axis of 1 (Triton's dynamic batcher stacks requests on it).

Errors: the model reports its own failures with a stable code at the start of the message
(``ADAPTER_NOT_FOUND: ...``, ``INVALID_ARGUMENT: ...``); the gRPC status of such python-backend errors
is not reliable (INTERNAL for all of them in Triton 2.51), so the code prefix decides first and the
status only when there is none. See :func:`map_triton_error` for the table.

Retries: only failures where Triton never ran the request (UNAVAILABLE: down, restarting, model not
ready) are retried, with exponential backoff and jitter per :class:`RetryPolicy`, and never past the
caller's deadline, which is also each attempt's gRPC timeout.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from services.common.errors import SprError
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
from services.policy.sampling import Sampling

_LOG = logging.getLogger(__name__)

OUTPUTS = ("TEXT", "TOKEN_LOGPROBS", "NUM_TOKENS", "ADAPTER_VERSION")
_MAX_MESSAGE_BYTES = 2**31 - 1  # tritonclient's own default: images and N texts can be large

# "ADAPTER_NOT_FOUND: ..." at the start, or after Triton's own wrapping ("..., message: CODE: ...").
_CODE_PREFIX = re.compile(r"(?:^|message: )([A-Z][A-Z0-9_]+): ")
_BY_CODE: dict[str, type[SprError]] = {
    "ADAPTER_NOT_FOUND": AdapterNotFound,
    "INVALID_ARGUMENT": PolicyRejected,
    "UNAVAILABLE": PolicyUnavailable,
}
_BY_STATUS: dict[str, type[SprError]] = {
    "UNAVAILABLE": PolicyUnavailable,
    "DEADLINE_EXCEEDED": PolicyTimeout,
    "CANCELLED": RequestCancelled,
    "INVALID_ARGUMENT": PolicyRejected,
}


@dataclass(frozen=True)
class PolicyRequest:
    """One generation request: an encoded image exactly as the model should see it, and sampling."""

    image: bytes
    instruction: str
    sampling: Sampling
    adapter: str = ""


@dataclass(frozen=True)
class PolicyOutput:
    """The model's answer: N texts, their token log-probabilities, the adapter version that ran."""

    texts: list[str]
    token_logprobs: list[list[float]]
    adapter_version: str


def map_triton_error(exc: InferenceServerException) -> SprError:
    """A Triton client error as the describer's typed error.

    ==========================================  =====================================
    Triton error                                describer error (gRPC status)
    ==========================================  =====================================
    message ``ADAPTER_NOT_FOUND: ...``          ADAPTER_NOT_FOUND (NOT_FOUND)
    message ``INVALID_ARGUMENT: ...``           POLICY_INVALID_ARGUMENT (INVALID_ARGUMENT)
    status UNAVAILABLE (down, model not ready)  POLICY_UNAVAILABLE (UNAVAILABLE, retried)
    status DEADLINE_EXCEEDED                    POLICY_DEADLINE_EXCEEDED (DEADLINE_EXCEEDED)
    status CANCELLED                            REQUEST_CANCELLED (CANCELLED)
    status INVALID_ARGUMENT (bad tensors)       POLICY_INVALID_ARGUMENT (INVALID_ARGUMENT)
    anything else                               POLICY_FAILED (UNAVAILABLE, not retried)
    ==========================================  =====================================
    """
    message = str(exc.message() or "")
    status = str(exc.status() or "").removeprefix("StatusCode.")
    match = _CODE_PREFIX.search(message)
    if match is not None and match.group(1) in _BY_CODE:
        cls = _BY_CODE[match.group(1)]
        detail = message[match.end() :]
    else:
        cls = _BY_STATUS.get(status, PolicyFailed)
        detail = message
    return cls(
        f"policy model: {detail}" if detail else f"policy model failed ({status or 'no status'})",
        details={"triton_status": status or "none"},
    )


def build_inputs(request: PolicyRequest) -> list[Any]:
    """The ``InferInput`` tensors of one request, each with its batch axis of 1."""
    sampling = request.sampling
    image = np.frombuffer(request.image, dtype=np.uint8)[None, :]
    tensors: list[tuple[str, npt.NDArray[Any], str]] = [
        ("IMAGE", image, "UINT8"),
        ("INSTRUCTION", np.array([[request.instruction.encode("utf-8")]], dtype=np.object_), "BYTES"),
        ("NUM_SAMPLES", np.array([[sampling.num_samples]], dtype=np.int32), "INT32"),
        ("TEMPERATURE", np.array([[sampling.temperature]], dtype=np.float32), "FP32"),
        ("TOP_P", np.array([[sampling.top_p]], dtype=np.float32), "FP32"),
        ("MAX_NEW_TOKENS", np.array([[sampling.max_new_tokens]], dtype=np.int32), "INT32"),
        ("GREEDY", np.array([[sampling.greedy]], dtype=np.bool_), "BOOL"),
        ("ADAPTER", np.array([[request.adapter.encode("utf-8")]], dtype=np.object_), "BYTES"),
    ]
    if sampling.seed is not None:  # absent = unseeded; the model reads a negative seed the same way
        tensors.append(("SEED", np.array([[sampling.seed]], dtype=np.int64), "INT64"))
    inputs = []
    for name, array, datatype in tensors:
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def parse_outputs(result: Any) -> PolicyOutput:
    """Texts, log-probabilities trimmed to each sample's NUM_TOKENS, and the adapter version."""
    texts = [_text(t) for t in _row(result, "TEXT")]
    num_tokens = [int(n) for n in _row(result, "NUM_TOKENS")]
    logprobs = result.as_numpy("TOKEN_LOGPROBS")
    rows = logprobs.reshape(-1, logprobs.shape[-1]) if logprobs is not None and logprobs.size else None
    token_logprobs = [
        [] if rows is None or i >= len(rows) else [float(v) for v in rows[i, : num_tokens[i]]]
        for i in range(len(texts))
    ]
    version = _row(result, "ADAPTER_VERSION")
    return PolicyOutput(texts, token_logprobs, _text(version[0]) if len(version) else "")


def _row(result: Any, name: str) -> Sequence[Any]:
    array = result.as_numpy(name)
    if array is None:
        raise PolicyFailed(f"policy model returned no {name} output")
    return list(array.reshape(-1))


def _text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class TritonPolicyClient:
    """Calls ``spr_policy`` with retries; one instance per process, used from one event loop.

    The underlying aio client is created lazily on first use, inside the running loop, because a
    ``grpc.aio`` channel belongs to the loop it was created in.
    """

    def __init__(
        self,
        url: str,
        model_name: str = "spr_policy",
        *,
        model_version: str = "",
        retry: RetryPolicy | None = None,
        ssl: bool = False,
        reconnect_backoff_s: float = 1.0,
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.model_version = model_version
        self.retry = retry or RetryPolicy()
        self._ssl = ssl
        self._reconnect_ms = max(1, int(reconnect_backoff_s * 1000))
        self._client: Any = None
        self._random = random.Random()

    def _connection(self) -> Any:
        if self._client is None:
            self._client = InferenceServerClient(self.url, ssl=self._ssl, channel_args=self._channel_args())
        return self._client

    def _channel_args(self) -> list[tuple[str, int]]:
        """tritonclient's message limits, plus a short reconnect backoff.

        After Triton restarts, a gRPC channel waits out its reconnect backoff (growing up to 120 s by
        default) before it tries again, failing every call meanwhile; capping it lets the describer
        recover within about a second of Triton coming back.
        """
        return [
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", self._reconnect_ms),
            ("grpc.max_reconnect_backoff_ms", self._reconnect_ms),
        ]

    async def generate(self, request: PolicyRequest, deadline: float | None = None) -> PolicyOutput:
        """Generate; ``deadline`` is a ``time.monotonic()`` instant bounding all attempts and waits.

        Raises the :func:`map_triton_error` error of the last attempt; PolicyTimeout when the deadline
        leaves no time for (another) attempt.
        """
        inputs = build_inputs(request)
        outputs = [InferRequestedOutput(name) for name in OUTPUTS]
        for attempt in range(self.retry.max_attempts):
            timeout = _remaining(deadline)
            try:
                return await self._attempt(inputs, outputs, timeout)
            except PolicyUnavailable as error:
                wait = self._backoff(attempt)
                last_attempt = attempt + 1 >= self.retry.max_attempts
                if last_attempt or (deadline is not None and time.monotonic() + wait >= deadline):
                    raise
                _LOG.info("Triton unavailable (%s); retry %d in %.2fs", error.message, attempt + 1, wait)
                metrics.TRITON_RETRIES.inc()
                await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _attempt(self, inputs: list[Any], outputs: list[Any], timeout: float | None) -> PolicyOutput:
        started = time.monotonic()
        outcome = "cancelled"  # unless it returns or raises below
        try:
            result = await self._connection().infer(
                self.model_name,
                inputs,
                model_version=self.model_version,
                outputs=outputs,
                client_timeout=timeout,
            )
            output = parse_outputs(result)
            outcome = "ok"
            return output
        except InferenceServerException as exc:
            error = map_triton_error(exc)
            outcome = error.code
            raise error from exc
        except SprError as error:
            outcome = error.code
            raise
        finally:
            metrics.TRITON_SECONDS.labels(outcome).observe(time.monotonic() - started)

    def _backoff(self, retry: int) -> float:
        nominal = self.retry.backoff_s(retry)
        return max(0.0, nominal * (1.0 + self.retry.jitter * self._random.uniform(-1.0, 1.0)))

    async def is_ready(self, timeout: float = 2.0) -> bool:
        """True when Triton answers and the model is ready (never raises)."""
        try:
            ready = await self._connection().is_model_ready(
                self.model_name, self.model_version, client_timeout=timeout
            )
            return bool(ready)
        except InferenceServerException:
            return False

    async def close(self) -> None:
        """Close the channel (a later call reconnects)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline``; PolicyTimeout once it passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise PolicyTimeout("the request deadline passed before the policy model could answer")
    return left
