"""Image loading and cropping shared by the services, with one bad-input discipline.

Every failure raises a typed :mod:`services.common.errors` error with a stable code:

===========================  ======================  ==============================================
code                         gRPC status             when
===========================  ======================  ==============================================
IMAGE_NOT_FOUND              NOT_FOUND               missing file, HTTP 404/410
IMAGE_URI_UNSUPPORTED        INVALID_ARGUMENT        scheme other than file/path (http(s) if off)
IMAGE_ACCESS_DENIED          PERMISSION_DENIED       outside ``allowed_roots``, unreadable, HTTP 401/403
IMAGE_FETCH_FAILED           UNAVAILABLE (retry)     I/O or network error, timeout, HTTP 5xx
IMAGE_TOO_LARGE              RESOURCE_EXHAUSTED      encoded bytes above ``max_bytes``
IMAGE_TOO_MANY_PIXELS        RESOURCE_EXHAUSTED      declared size above ``max_pixels`` (bombs)
IMAGE_CHECKSUM_MISMATCH      DATA_LOSS               sha256 differs from the reference's
IMAGE_UNDECODABLE            INVALID_ARGUMENT        not an allowed format, corrupt data
IMAGE_TRUNCATED              INVALID_ARGUMENT        valid header, data ends early
REGION_INVALID               INVALID_ARGUMENT        NaN/inf coordinates, x2 <= x1 or y2 <= y1
REGION_OUT_OF_BOUNDS         INVALID_ARGUMENT        box (partly) outside the image
===========================  ======================  ==============================================

Decoding is limited to common raster formats (Pillow would otherwise also open e.g. EPS, which runs
Ghostscript). The pixel limit is checked from the header BEFORE any pixel is decoded. EXIF orientation
is NOT applied: annotated boxes refer to the stored pixel grid, as in COCO tooling.

Fetching http(s) is off by default: image URIs come from requests and Kafka records, and a server that
fetches arbitrary URLs can be abused to reach internal endpoints (SSRF). Likewise ``allowed_roots``
confines file paths when set.
"""

from __future__ import annotations

import hashlib
import io
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import (
    ImageAccessDenied,
    ImageChecksumMismatch,
    ImageError,
    ImageFetchFailed,
    ImageNotFound,
    ImageTooLarge,
    ImageTooManyPixels,
    ImageTruncated,
    ImageUndecodable,
    ImageUriUnsupported,
    RegionInvalid,
    RegionOutOfBounds,
)

_MiB = 1024 * 1024
_READ_CHUNK = 1024 * 1024


class ImageLimits(BaseModel):
    """Limits and policy of image loading; nest it in a service's settings (``SPR_<SVC>_IMAGES__...``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(default=32 * _MiB, ge=1, description="Largest encoded image accepted, in bytes.")
    max_pixels: int = Field(
        default=40_000_000,
        ge=1,
        # Above Pillow's own hard limit (2x Image.MAX_IMAGE_PIXELS) Pillow refuses first anyway.
        le=2 * (Image.MAX_IMAGE_PIXELS or 89_478_485),
        description="Largest width*height accepted; checked from the header before decoding.",
    )
    allowed_formats: tuple[str, ...] = Field(
        default=("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"),
        description="Pillow formats that may be decoded.",
    )
    allow_http: bool = Field(
        default=False, description="Allow http(s):// image URIs (SSRF risk: enable deliberately)."
    )
    http_timeout_s: float = Field(default=10.0, gt=0, description="Timeout of one http(s) fetch.")
    allowed_roots: tuple[Path, ...] = Field(
        default=(), description="If set, file paths must resolve inside one of these directories."
    )


DEFAULT_LIMITS = ImageLimits()


class BoxLike(Protocol):
    """Anything with absolute pixel coordinates x1, y1, x2, y2 (e.g. ``spr.v1.Box``)."""

    @property
    def x1(self) -> float: ...
    @property
    def y1(self) -> float: ...
    @property
    def x2(self) -> float: ...
    @property
    def y2(self) -> float: ...


# --- reading bytes --------------------------------------------------------------------------------


def read_image_bytes(uri: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """The encoded bytes behind ``uri``: ``file://`` URI, plain path, or http(s) when allowed."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ImageUriUnsupported(f"file URI with a remote host is not supported: {uri!r}")
        return _read_file(Path(urllib.parse.unquote(parsed.path)), limits)
    if scheme == "" or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):  # plain (or Windows) path
        return _read_file(Path(uri), limits)
    if scheme in ("http", "https"):
        if not limits.allow_http:
            raise ImageUriUnsupported(
                "http(s) image URIs are disabled (allow_http=false)", details={"uri": uri}
            )
        return _read_http(uri, limits)
    raise ImageUriUnsupported(f"unsupported image URI scheme {scheme!r}", details={"uri": uri})


def _check_allowed(path: Path, limits: ImageLimits) -> Path:
    resolved = path.resolve()  # follows symlinks, so a link cannot escape the roots
    if limits.allowed_roots and not any(resolved.is_relative_to(r.resolve()) for r in limits.allowed_roots):
        raise ImageAccessDenied(f"{path} is outside the allowed image roots")
    return resolved


def _read_file(path: Path, limits: ImageLimits) -> bytes:
    try:
        resolved = _check_allowed(path, limits)
        size = resolved.stat().st_size
        if not resolved.is_file():
            raise ImageNotFound(f"{path} is not a regular file")
        if size > limits.max_bytes:
            raise ImageTooLarge(f"{path} has {size} bytes, limit {limits.max_bytes}", details={"bytes": size})
        return resolved.read_bytes()
    except FileNotFoundError as exc:
        raise ImageNotFound(f"no such image file: {path}") from exc
    except PermissionError as exc:
        raise ImageAccessDenied(f"cannot read {path}: permission denied") from exc
    except OSError as exc:
        raise ImageFetchFailed(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_http(uri: str, limits: ImageLimits) -> bytes:
    try:
        with urllib.request.urlopen(uri, timeout=limits.http_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
                raise ImageTooLarge(f"{uri} declares {declared} bytes, limit {limits.max_bytes}")
            data = bytes(response.read(limits.max_bytes + 1))  # never read more than the cap
    except urllib.error.HTTPError as exc:
        raise _http_error(uri, exc.code) from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise ImageFetchFailed(f"cannot fetch {uri}: {exc}") from exc
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{uri} is larger than {limits.max_bytes} bytes")
    return data


def _http_error(uri: str, status: int) -> ImageError:
    if status in (404, 410):
        return ImageNotFound(f"{uri}: HTTP {status}")
    if status in (401, 403):
        return ImageAccessDenied(f"{uri}: HTTP {status}")
    if status >= 500 or status == 429:
        return ImageFetchFailed(f"{uri}: HTTP {status}")
    return ImageUriUnsupported(f"{uri}: HTTP {status}")


def verify_sha256(data: bytes, expected: str) -> None:
    """Raise IMAGE_CHECKSUM_MISMATCH unless ``data`` hashes to ``expected`` (hex, any case)."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.strip().lower():
        raise ImageChecksumMismatch(
            "image sha256 does not match its reference", details={"expected": expected, "actual": actual}
        )


# --- decoding -------------------------------------------------------------------------------------


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode encoded bytes into a fully loaded RGB image (first frame of animations)."""
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(
            f"image has {len(data)} bytes, limit {limits.max_bytes}", details={"bytes": len(data)}
        )
    if not data:
        raise ImageUndecodable("image data is empty")
    try:
        with Image.open(io.BytesIO(data), formats=list(limits.allowed_formats)) as image:
            _check_pixels(image.size, limits)
            image.load()
            return _to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooManyPixels(f"image exceeds Pillow's decompression-bomb limit: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageUndecodable(
            f"not an image in an allowed format ({', '.join(limits.allowed_formats)})"
        ) from exc
    except (
        Exception
    ) as exc:  # decoders of untrusted data raise all sorts (OSError, SyntaxError, struct.error...)
        if "truncated" in str(exc):
            raise ImageTruncated(f"image data ends early: {exc}") from exc
        raise ImageUndecodable(f"corrupt image data ({type(exc).__name__}: {exc})") from exc


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageUndecodable(f"image has an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageTooManyPixels(
            f"image declares {width}x{height} = {width * height} pixels, limit {limits.max_pixels}",
            details={"width": width, "height": height},
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    # Palette images with transparency must go through RGBA, or Pillow warns and may mis-convert.
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(
    source: bytes | str, limits: ImageLimits = DEFAULT_LIMITS, *, expected_sha256: str | None = None
) -> Image.Image:
    """Bytes or URI -> RGB image; ``expected_sha256`` (e.g. ``ImageRef.sha256``) is checked when given."""
    data = source if isinstance(source, bytes) else read_image_bytes(source, limits)
    if expected_sha256:
        verify_sha256(data, expected_sha256)
    return decode_image(data, limits)


# --- regions --------------------------------------------------------------------------------------


def _coords(box: BoxLike | Sequence[float]) -> tuple[float, float, float, float]:
    if isinstance(box, Sequence):
        if len(box) != 4:
            raise RegionInvalid(f"a box needs 4 coordinates, got {len(box)}")
        return float(box[0]), float(box[1]), float(box[2]), float(box[3])
    return float(box.x1), float(box.y1), float(box.x2), float(box.y2)


def box_to_pixels(
    box: BoxLike | Sequence[float], width: int, height: int, *, clip: bool = False, tolerance: float = 0.5
) -> tuple[int, int, int, int]:
    """Validate an absolute-pixel box against a ``width`` x ``height`` image; return integer crop bounds.

    The bounds cover every pixel the box touches (floor/ceil). Coordinates may overshoot the image
    by ``tolerance`` pixels (float rounding of converted model boxes); beyond that the box is
    REGION_OUT_OF_BOUNDS unless ``clip`` is set, in which case it is intersected with the image.
    """
    x1, y1, x2, y2 = _coords(box)
    details = {"box": (x1, y1, x2, y2), "image_size": (width, height)}
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise RegionInvalid("box coordinates must be finite", details=details)
    if x2 <= x1 or y2 <= y1:
        raise RegionInvalid(f"empty or inverted box ({x1}, {y1}, {x2}, {y2})", details=details)
    inside = x1 >= -tolerance and y1 >= -tolerance and x2 <= width + tolerance and y2 <= height + tolerance
    if not inside and not clip:
        raise RegionOutOfBounds(
            f"box ({x1}, {y1}, {x2}, {y2}) is outside the {width}x{height} image", details=details
        )
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(width, math.ceil(x2)), min(height, math.ceil(y2))
    if right <= left or bottom <= top:
        raise RegionOutOfBounds(
            f"box ({x1}, {y1}, {x2}, {y2}) does not overlap the {width}x{height} image", details=details
        )
    return left, top, right, bottom


def crop_image(image: Image.Image, box: BoxLike | Sequence[float], *, clip: bool = False) -> Image.Image:
    """The part of ``image`` under ``box`` (absolute pixels); see :func:`box_to_pixels` for validation."""
    return image.crop(box_to_pixels(box, image.width, image.height, clip=clip))
