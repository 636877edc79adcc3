"""Typed errors with stable machine-readable codes, shared by every service.

Every error a service reports on purpose is a subclass of :class:`SprError`. Each subclass fixes

* ``code`` — a stable, machine-readable string (``IMAGE_UNDECODABLE``, ``REGION_OUT_OF_BOUNDS``, ...)
  that clients, dashboards (``spr_errors_total{code=...}``) and dead-letter records
  (``spr.v1.ErrorInfo.code``) rely on. Codes never change meaning once released;
* ``status`` — the gRPC status the error maps to;
* ``retryable`` — whether retrying the same input later can succeed (network, overload), so that
  Kafka stage runners know whether to retry or dead-letter a record.

The gRPC bootstrap (:mod:`services.common.grpc_server`) turns an ``SprError`` raised by a handler into
the right status automatically; :func:`abort_with_error` does the same explicitly. The code travels to
the client in the ``spr-error-code`` trailing metadata key and as the prefix of the status details
(``"IMAGE_TOO_LARGE: ..."``); :func:`error_code_of` reads it back on the client side.

New services add their own codes by subclassing, e.g.::

    class AdapterNotFound(SprError):
        code = "ADAPTER_NOT_FOUND"
        status = grpc.StatusCode.NOT_FOUND
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, NoReturn

import grpc

#: Trailing-metadata key carrying :attr:`SprError.code` to clients.
ERROR_CODE_METADATA_KEY = "spr-error-code"

_REGISTRY: dict[str, type[SprError]] = {}


class SprError(Exception):
    """Base of every deliberate, typed error; subclasses set ``code``, ``status`` and ``retryable``."""

    code: ClassVar[str] = "INTERNAL"
    status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    retryable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Codes are a public contract: two classes claiming one code would make the code ambiguous.
        existing = _REGISTRY.get(cls.code)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise TypeError(f"error code {cls.code!r} already used by {existing.__qualname__}")
        _REGISTRY[cls.code] = cls

    def __init__(self, message: str, *, details: Mapping[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, object] = dict(details or {})

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly form, e.g. for logs or dead-letter records."""
        return {
            "code": self.code,
            "status": self.status.name,
            "retryable": self.retryable,
            "message": self.message,
            "details": {k: str(v) for k, v in self.details.items()},
        }


def error_codes() -> dict[str, type[SprError]]:
    """Every registered error code and its class (import the defining modules first)."""
    return dict(_REGISTRY)


# --- generic errors ------------------------------------------------------------------------------


class InvalidRequest(SprError):
    """A request field is missing or malformed (anything without a more specific code)."""

    code = "INVALID_REQUEST"
    status = grpc.StatusCode.INVALID_ARGUMENT


class UpstreamUnavailable(SprError):
    """A dependency (Triton, a model, the broker, the adapter store) cannot be reached right now."""

    code = "UPSTREAM_UNAVAILABLE"
    status = grpc.StatusCode.UNAVAILABLE
    retryable = True


# --- images --------------------------------------------------------------------------------------


class ImageError(SprError):
    """Base of the image loading errors (catch this to handle any bad image)."""

    code = "IMAGE_ERROR"
    status = grpc.StatusCode.INVALID_ARGUMENT


class ImageUndecodable(ImageError):
    """The bytes are not an image in an allowed format, or the image data is corrupt."""

    code = "IMAGE_UNDECODABLE"
    status = grpc.StatusCode.INVALID_ARGUMENT


class ImageTruncated(ImageError):
    """The image header is valid but its data ends early."""

    code = "IMAGE_TRUNCATED"
    status = grpc.StatusCode.INVALID_ARGUMENT


class ImageTooLarge(ImageError):
    """The encoded image is bigger than the configured byte limit."""

    code = "IMAGE_TOO_LARGE"
    # Same status gRPC itself uses for an oversize message.
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class ImageTooManyPixels(ImageError):
    """The image declares more pixels than allowed (a decompression bomb, or just too big)."""

    code = "IMAGE_TOO_MANY_PIXELS"
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class ImageNotFound(ImageError):
    """The image URI points at nothing (missing file, HTTP 404/410)."""

    code = "IMAGE_NOT_FOUND"
    status = grpc.StatusCode.NOT_FOUND


class ImageUriUnsupported(ImageError):
    """The URI scheme is not supported or not enabled (e.g. http(s) when fetching is off)."""

    code = "IMAGE_URI_UNSUPPORTED"
    status = grpc.StatusCode.INVALID_ARGUMENT


class ImageAccessDenied(ImageError):
    """The path is outside the allowed roots, or the process may not read it."""

    code = "IMAGE_ACCESS_DENIED"
    status = grpc.StatusCode.PERMISSION_DENIED


class ImageFetchFailed(ImageError):
    """A transient failure while fetching the image (network error, timeout, HTTP 5xx)."""

    code = "IMAGE_FETCH_FAILED"
    status = grpc.StatusCode.UNAVAILABLE
    retryable = True


class ImageChecksumMismatch(ImageError):
    """The image bytes do not match the sha256 the reference carries."""

    code = "IMAGE_CHECKSUM_MISMATCH"
    status = grpc.StatusCode.DATA_LOSS


# --- regions -------------------------------------------------------------------------------------


class RegionInvalid(SprError):
    """A box is degenerate: non-finite coordinates, or x2 <= x1 / y2 <= y1."""

    code = "REGION_INVALID"
    status = grpc.StatusCode.INVALID_ARGUMENT


class RegionOutOfBounds(SprError):
    """A box lies (partly) outside the image it refers to."""

    code = "REGION_OUT_OF_BOUNDS"
    status = grpc.StatusCode.INVALID_ARGUMENT


# --- gRPC glue -----------------------------------------------------------------------------------


def status_details(error: SprError) -> str:
    """The gRPC status details for ``error``: ``"<CODE>: <message>"``."""
    return str(error)


def abort_with_error(context: grpc.ServicerContext, error: SprError) -> NoReturn:
    """Abort the RPC behind ``context`` with the status, details and code metadata of ``error``."""
    context.set_trailing_metadata(((ERROR_CODE_METADATA_KEY, error.code),))
    context.abort(error.status, status_details(error))


def error_code_of(rpc_error: grpc.RpcError) -> str | None:
    """Client side: the ``SprError`` code of a failed call, or None when the server sent none."""
    trailing = getattr(rpc_error, "trailing_metadata", None)
    if not callable(trailing):
        return None
    for key, value in trailing() or ():
        if key == ERROR_CODE_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
