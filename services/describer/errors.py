"""The describer's own error codes (on top of the shared image/region codes of services.common.errors).

Codes are a public contract (clients, dashboards, dead-letter headers rely on them); see
:mod:`services.common.errors` for the rules.
"""

from __future__ import annotations

import grpc

from services.common.errors import SprError


class AdapterNotFound(SprError):
    """The requested adapter version or alias is unknown to the policy (and to its adapter store)."""

    code = "ADAPTER_NOT_FOUND"
    status = grpc.StatusCode.NOT_FOUND


class TooManySamples(SprError):
    """``sampling.num_samples`` is above the describer's cap."""

    code = "TOO_MANY_SAMPLES"
    status = grpc.StatusCode.INVALID_ARGUMENT


class TemplateUnknown(SprError):
    """The template id is not one of the configured model family's templates."""

    code = "TEMPLATE_UNKNOWN"
    status = grpc.StatusCode.INVALID_ARGUMENT


class PolicyRejected(SprError):
    """The policy model refused the request as invalid (its ``INVALID_ARGUMENT: ...`` errors)."""

    code = "POLICY_INVALID_ARGUMENT"
    status = grpc.StatusCode.INVALID_ARGUMENT


class PolicyUnavailable(SprError):
    """Triton cannot be reached or the model is not ready, after the retries of the retry policy."""

    code = "POLICY_UNAVAILABLE"
    status = grpc.StatusCode.UNAVAILABLE
    retryable = True


class PolicyFailed(SprError):
    """The policy model failed while generating (an error without a known code).

    UNAVAILABLE for clients (the failure is on the serving side, not in their request), but not
    retried inside one request: it may well be deterministic for this input.
    """

    code = "POLICY_FAILED"
    status = grpc.StatusCode.UNAVAILABLE


class PolicyTimeout(SprError):
    """The caller's deadline ran out before the policy answered."""

    code = "POLICY_DEADLINE_EXCEEDED"
    status = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class RequestCancelled(SprError):
    """The caller went away while the policy was generating."""

    code = "REQUEST_CANCELLED"
    status = grpc.StatusCode.CANCELLED
    retryable = True
