"""The admin service's error codes (rules: :mod:`services.common.errors`).

Input errors use the shared ``INVALID_REQUEST``; a broker or store that cannot be reached uses the
shared ``UPSTREAM_UNAVAILABLE``.
"""

from __future__ import annotations

import grpc

from services.common.errors import SprError


class VersionNotInStore(SprError):
    """The adapter version has no complete folder (with its manifest) in the adapter store."""

    code = "ADAPTER_NOT_IN_STORE"
    status = grpc.StatusCode.NOT_FOUND


class AdapterCorrupt(SprError):
    """The version's files do not match the sha256 values of its manifest."""

    code = "ADAPTER_CORRUPT"
    status = grpc.StatusCode.DATA_LOSS


class AdapterBaseMismatch(SprError):
    """The version was trained on another base model than the one this deployment serves."""

    code = "ADAPTER_BASE_MISMATCH"
    status = grpc.StatusCode.FAILED_PRECONDITION


class AliasNotFound(SprError):
    """The alias was never set on the ``adapters`` topic."""

    code = "ALIAS_NOT_FOUND"
    status = grpc.StatusCode.NOT_FOUND


class EvalMetricsMissing(SprError):
    """The eval gate cannot decide: a manifest lacks a metric the gate compares."""

    code = "EVAL_METRICS_MISSING"
    status = grpc.StatusCode.FAILED_PRECONDITION


class EvalGateFailed(SprError):
    """The version is worse than the alias's current version by more than the tolerance."""

    code = "EVAL_GATE_FAILED"
    status = grpc.StatusCode.FAILED_PRECONDITION


class NoPreviousVersion(SprError):
    """A rollback without ``to_version`` for an alias whose earlier version is not on record."""

    code = "NO_PREVIOUS_VERSION"
    status = grpc.StatusCode.FAILED_PRECONDITION
