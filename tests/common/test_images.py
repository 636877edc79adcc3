"""Image loading and cropping: each kind of bad input gets its own typed error and gRPC status."""

from __future__ import annotations

import hashlib
import http.server
import io
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from services.common import errors
from services.common.images import (
    ImageLimits,
    box_to_pixels,
    crop_image,
    decode_image,
    load_image,
    read_image_bytes,
)
from spr.v1 import common_pb2


def _png(width: int = 40, height: int = 30, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    image = Image.new(mode, (width, height))
    for x in range(width):  # a gradient, so that the compressed data is not trivially short
        image.putpixel((x, x % height), (x * 5) % 256 if mode in ("L", "P") else ((x * 5) % 256, 0, 0))
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header claims ``width`` x ``height``: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_decode_valid_png_to_rgb() -> None:
    image = decode_image(_png(40, 30, mode="L"))
    assert image.mode == "RGB"
    assert image.size == (40, 30)


def test_palette_with_transparency_converts_without_warning() -> None:
    buffer = io.BytesIO()
    Image.new("P", (8, 8)).save(buffer, "PNG", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(buffer.getvalue()).mode == "RGB"


@pytest.mark.parametrize("data", [b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b""])
def test_corrupt_bytes_are_undecodable(data: bytes) -> None:
    with pytest.raises(errors.ImageUndecodable) as info:
        decode_image(data)
    assert info.value.code == "IMAGE_UNDECODABLE"
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT


def test_format_outside_allow_list_is_undecodable() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PPM")
    with pytest.raises(errors.ImageUndecodable):
        decode_image(buffer.getvalue())


def test_truncated_png() -> None:
    data = _png(64, 64)
    with pytest.raises(errors.ImageTruncated) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.code == "IMAGE_TRUNCATED"


def test_decompression_bomb_beyond_pillow_limit() -> None:
    bomb = _png_declaring(100_000, 100_000)
    assert len(bomb) < 100
    with pytest.raises(errors.ImageTooManyPixels) as info:
        decode_image(bomb)
    assert info.value.code == "IMAGE_TOO_MANY_PIXELS"
    assert info.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_pixel_limit_checked_before_decoding() -> None:
    with pytest.raises(errors.ImageTooManyPixels, match="5000x4000"):
        decode_image(_png_declaring(5_000, 4_000), ImageLimits(max_pixels=10_000_000))


def test_byte_limit() -> None:
    with pytest.raises(errors.ImageTooLarge) as info:
        decode_image(_png(), ImageLimits(max_bytes=100))
    assert info.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- URIs ----------------------------------------------------------------------------------------------


def test_load_from_path_and_file_uri(tmp_path: Path) -> None:
    path = tmp_path / "a b.png"  # a space, to check file:// unquoting
    path.write_bytes(_png(12, 10))
    assert load_image(str(path)).size == (12, 10)
    assert load_image(path.as_uri()).size == (12, 10)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_image(str(path), expected_sha256=digest.upper()).size == (12, 10)
    with pytest.raises(errors.ImageChecksumMismatch):
        load_image(str(path), expected_sha256="0" * 64)


def test_uri_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.ImageNotFound) as info:
        read_image_bytes(str(tmp_path / "missing.png"))
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    with pytest.raises(errors.ImageNotFound):
        read_image_bytes(str(tmp_path))  # a directory
    with pytest.raises(errors.ImageUriUnsupported):
        read_image_bytes("s3://bucket/key.png")
    with pytest.raises(errors.ImageUriUnsupported, match="disabled"):
        read_image_bytes("https://example.com/a.png")  # off by default; nothing is fetched
    big = tmp_path / "big.png"
    big.write_bytes(_png())
    with pytest.raises(errors.ImageTooLarge):
        read_image_bytes(str(big), ImageLimits(max_bytes=10))


def test_allowed_roots(tmp_path: Path) -> None:
    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "ok.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    (inside / "link.png").symlink_to(tmp_path / "secret.png")
    limits = ImageLimits(allowed_roots=(inside,))
    assert read_image_bytes(str(inside / "ok.png"), limits)
    with pytest.raises(errors.ImageAccessDenied):
        read_image_bytes(str(tmp_path / "secret.png"), limits)
    with pytest.raises(errors.ImageAccessDenied):
        read_image_bytes(str(inside / "link.png"), limits)  # a symlink cannot escape
    with pytest.raises(errors.ImageAccessDenied):
        read_image_bytes(str(inside / ".." / "secret.png"), limits)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[str]:
    """A loopback HTTP server over tmp_path."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    (tmp_path / "a.png").write_bytes(_png(9, 7))
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_when_allowed(http_root: str) -> None:
    limits = ImageLimits(allow_http=True, http_timeout_s=5)
    assert load_image(f"{http_root}/a.png", limits).size == (9, 7)
    with pytest.raises(errors.ImageNotFound):
        read_image_bytes(f"{http_root}/missing.png", limits)
    with pytest.raises(errors.ImageTooLarge):
        read_image_bytes(f"{http_root}/a.png", ImageLimits(allow_http=True, max_bytes=20))
    with pytest.raises(errors.ImageFetchFailed) as info:
        read_image_bytes("http://127.0.0.1:9/a.png", limits)  # discard port: connection refused
    assert info.value.retryable


# --- regions -------------------------------------------------------------------------------------------


def test_crop_with_proto_box_and_tuple() -> None:
    image = decode_image(_png(40, 30))
    assert crop_image(image, common_pb2.Box(x1=10, y1=5, x2=20.2, y2=15)).size == (11, 10)
    assert crop_image(image, (0, 0, 40, 30)).size == (40, 30)
    assert box_to_pixels((-0.3, 0, 40.4, 30), 40, 30) == (0, 0, 40, 30)  # rounding noise tolerated


def test_region_out_of_bounds() -> None:
    image = decode_image(_png(40, 30))
    with pytest.raises(errors.RegionOutOfBounds) as info:
        crop_image(image, (30, 20, 50, 29))
    assert info.value.code == "REGION_OUT_OF_BOUNDS"
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert crop_image(image, (30, 20, 50, 29), clip=True).size == (10, 9)
    with pytest.raises(errors.RegionOutOfBounds):
        crop_image(image, (100, 100, 120, 120), clip=True)  # no overlap at all


@pytest.mark.parametrize(
    "box", [(10, 10, 5, 20), (10, 10, 10, 20), (float("nan"), 0, 5, 5), (0, 0, float("inf"), 5), (1, 2, 3)]
)
def test_region_invalid(box: tuple[float, ...]) -> None:
    with pytest.raises(errors.RegionInvalid):
        box_to_pixels(box, 40, 30)
    with pytest.raises(errors.RegionInvalid):
        box_to_pixels(common_pb2.Box(), 40, 30)  # an unset proto box is empty
