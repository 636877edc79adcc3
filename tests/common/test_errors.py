"""Error codes are a public contract: unique, stable, each mapped to one gRPC status."""

from __future__ import annotations

import grpc
import pytest

from services.common import errors, images  # noqa: F401  (images: make sure every code is registered)


def test_codes_are_unique_upper_snake_and_mapped() -> None:
    codes = errors.error_codes()
    for code, cls in codes.items():
        assert code == cls.code
        assert code.isupper() and " " not in code
        assert isinstance(cls.status, grpc.StatusCode)
    assert codes["IMAGE_TOO_LARGE"].status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert codes["IMAGE_NOT_FOUND"].status == grpc.StatusCode.NOT_FOUND
    assert codes["IMAGE_FETCH_FAILED"].retryable


def test_duplicate_code_is_refused() -> None:
    with pytest.raises(TypeError, match="already used"):

        class Clash(errors.SprError):  # pragma: no cover - the class statement itself fails
            code = "IMAGE_UNDECODABLE"


def test_error_renders_code_and_details() -> None:
    error = errors.RegionOutOfBounds("box outside", details={"box": (1, 2, 3, 4)})
    assert str(error) == "REGION_OUT_OF_BOUNDS: box outside"
    assert error.to_dict() == {
        "code": "REGION_OUT_OF_BOUNDS",
        "status": "INVALID_ARGUMENT",
        "retryable": False,
        "message": "box outside",
        "details": {"box": "(1, 2, 3, 4)"},
    }
