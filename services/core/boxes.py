"""Boxes and the coordinate systems SPR moves them between (SPEC §2, "Parsing").

Every box the core library hands out is in **absolute pixels** (``x1, y1, x2, y2``, ``x1 <= x2``,
``y1 <= y2``) of some frame; model-native coordinates exist only at the edge:

* 0–1 floats (Shikra style): ``f = v / size`` and back ``v = f * size`` — exact up to float rounding.
* Integer bins with ``B`` steps (``B = 999`` for Ferret/Shikra/CogVLM ``[x1, y1, x2, y2]``,
  ``B = 1000`` for Qwen2-VL ``(x1,y1),(x2,y2)``)::

      bin = round(v * B / size)        (Python's round: half to even)
      v   = bin * size / B

  so bin ``0`` is the frame's left/top edge and bin ``B`` its right/bottom edge, and a pixel value
  survives pixels -> bins -> pixels within half a bin (``size / (2 B)`` pixels).

The *frame* is the image the model saw. With the crop prompt it is the region crop, possibly resized
to ``frame_w x frame_h``; :func:`frame_to_image` / :func:`image_to_frame` move boxes between that frame
and the full image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import numpy as np
import numpy.typing as npt

BINS_FERRET = 999
"""Bin count of the ``[x1, y1, x2, y2]`` integer format (Ferret, Shikra, CogVLM): values 0–999."""

BINS_QWEN2 = 1000
"""Bin count of Qwen2-VL's ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` format: values 0–1000."""

Coords = tuple[float, float, float, float]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Box:
    """Axis-aligned box in absolute pixels; callers keep ``x1 <= x2`` and ``y1 <= y2``."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        """Area, 0 for degenerate (or inverted) boxes rather than a negative number."""
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2.0, (self.y1 + self.y2) / 2.0)

    def as_tuple(self) -> Coords:
        return (self.x1, self.y1, self.x2, self.y2)

    def to_xywh(self) -> Coords:
        """COCO ``[x, y, w, h]``."""
        return (self.x1, self.y1, self.width, self.height)

    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> Box:
        return cls(x, y, x + w, y + h)

    def union(self, other: Box) -> Box:
        """Smallest box holding both (the sampler's region growth)."""
        return Box(
            min(self.x1, other.x1), min(self.y1, other.y1), max(self.x2, other.x2), max(self.y2, other.y2)
        )

    def intersection_area(self, other: Box) -> float:
        w = min(self.x2, other.x2) - max(self.x1, other.x1)
        h = min(self.y2, other.y2) - max(self.y1, other.y1)
        return max(w, 0.0) * max(h, 0.0)

    def contains(self, other: Box) -> bool:
        return self.x1 <= other.x1 and self.y1 <= other.y1 and other.x2 <= self.x2 and other.y2 <= self.y2

    def clip(self, frame_w: float, frame_h: float) -> Box:
        """Clamp every coordinate into ``[0, frame_w] x [0, frame_h]``."""
        return Box(
            min(max(self.x1, 0.0), frame_w),
            min(max(self.y1, 0.0), frame_h),
            min(max(self.x2, 0.0), frame_w),
            min(max(self.y2, 0.0), frame_h),
        )

    def pad(self, fraction: float) -> Box:
        """Grow every side by ``fraction`` of the box's own width (x) or height (y)."""
        dx, dy = self.width * fraction, self.height * fraction
        return Box(self.x1 - dx, self.y1 - dy, self.x2 + dx, self.y2 + dy)


@dataclass(frozen=True, slots=True)
class AnnotatedBox:
    """One annotated object of a dataset image (proto ``AnnotatedObject``), box in image pixels."""

    annotation_id: int
    category: str
    box: Box


_CORNERS = attrgetter("x1", "y1", "x2", "y2")


def boxes_to_array(boxes: Iterable[Box]) -> FloatArray:
    """Stack boxes into the ``(n, 4)`` float64 array the scoring functions take (``(0, 4)`` if none)."""
    # One flat pass through C iterators: ~2x faster than numpy converting a list of 4-tuples.
    flat: FloatArray = np.fromiter(chain.from_iterable(map(_CORNERS, boxes)), dtype=np.float64)
    return flat.reshape(-1, 4)


# --- 0-1 floats -----------------------------------------------------------------------------------


def to_normalized(box: Box, frame_w: float, frame_h: float) -> Coords:
    """Pixels -> 0–1 floats of the frame: ``f = v / size``."""
    return (box.x1 / frame_w, box.y1 / frame_h, box.x2 / frame_w, box.y2 / frame_h)


def from_normalized(coords: Coords, frame_w: float, frame_h: float) -> Box:
    """0–1 floats -> pixels: ``v = f * size`` (no clipping; see :func:`sanitize_box`)."""
    fx1, fy1, fx2, fy2 = coords
    return Box(fx1 * frame_w, fy1 * frame_h, fx2 * frame_w, fy2 * frame_h)


# --- integer bins ---------------------------------------------------------------------------------


def to_bins(box: Box, frame_w: float, frame_h: float, bins: int) -> tuple[int, int, int, int]:
    """Pixels -> integer bins: ``bin = round(v * B / size)``; ``B`` is 999 or 1000 (module doc)."""
    # Multiplying before dividing keeps exact cases exact (e.g. 63 px of a 999 px frame is bin 63).
    return (
        round(box.x1 * bins / frame_w),
        round(box.y1 * bins / frame_h),
        round(box.x2 * bins / frame_w),
        round(box.y2 * bins / frame_h),
    )


def from_bins(coords: Coords, frame_w: float, frame_h: float, bins: int) -> Box:
    """Bins -> pixels: ``v = bin * size / B``. Takes floats so that odd model output still converts."""
    bx1, by1, bx2, by2 = coords
    return Box(bx1 * frame_w / bins, by1 * frame_h / bins, bx2 * frame_w / bins, by2 * frame_h / bins)


# --- frames: the full image vs. the (possibly resized) crop the model saw ---------------------------


def frame_to_image(box: Box, crop: Box | None, frame_w: float, frame_h: float) -> Box:
    """A box in the model's frame -> full-image pixels.

    ``crop`` is the region the model saw, in full-image pixels, shown to it as a ``frame_w x frame_h``
    image (equal to the crop's size when it was not resized); ``None`` means the model saw the full image.
    """
    if crop is None:
        return box
    sx, sy = crop.width / frame_w, crop.height / frame_h
    return Box(crop.x1 + box.x1 * sx, crop.y1 + box.y1 * sy, crop.x1 + box.x2 * sx, crop.y1 + box.y2 * sy)


def frame_to_image_array(boxes: FloatArray, crop: Box | None, frame_w: float, frame_h: float) -> FloatArray:
    """:func:`frame_to_image` for an ``(n, 4)`` array of boxes at once."""
    if crop is None:
        return boxes
    sx, sy = crop.width / frame_w, crop.height / frame_h
    moved: FloatArray = boxes * (sx, sy, sx, sy) + (crop.x1, crop.y1, crop.x1, crop.y1)
    return moved


def image_to_frame(box: Box, crop: Box | None, frame_w: float, frame_h: float) -> Box:
    """Inverse of :func:`frame_to_image`: full-image pixels -> the model's frame (not clipped)."""
    if crop is None:
        return box
    sx, sy = frame_w / crop.width, frame_h / crop.height
    return Box(
        (box.x1 - crop.x1) * sx, (box.y1 - crop.y1) * sy, (box.x2 - crop.x1) * sx, (box.y2 - crop.y1) * sy
    )


# --- repair ---------------------------------------------------------------------------------------


def sanitize_box(
    x1: float, y1: float, x2: float, y2: float, frame_w: float, frame_h: float
) -> tuple[Box | None, str | None]:
    """Repair or drop a box read from model output; never raises.

    Returns ``(box, None)`` for a clean box, ``(box, reason)`` when it was repaired (inverted corners
    swapped, coordinates clipped into the frame) and ``(None, reason)`` when it was dropped (NaN/inf,
    unusable frame, zero area after clipping). Reasons of several repairs are joined by ``"; "``.
    """
    if 0.0 <= x1 < x2 <= frame_w and 0.0 <= y1 < y2 <= frame_h:  # the common case; False for NaN
        return Box(float(x1), float(y1), float(x2), float(y2)), None
    try:
        x1, y1, x2, y2 = float(x1), float(y1), float(x2), float(y2)
        frame_w, frame_h = float(frame_w), float(frame_h)
    except (TypeError, ValueError, OverflowError):  # e.g. an int too large for a float
        return None, "dropped: coordinate is not a number"
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, f"dropped: non-finite coordinate in {(x1, y1, x2, y2)!r}"
    if not (math.isfinite(frame_w) and math.isfinite(frame_h) and frame_w > 0 and frame_h > 0):
        return None, f"dropped: unusable frame {frame_w!r}x{frame_h!r}"
    repairs: list[str] = []
    if x1 > x2 or y1 > y2:
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
        repairs.append("swapped inverted corners")
    box = Box(x1, y1, x2, y2)
    clipped = box.clip(frame_w, frame_h)
    if clipped != box:
        repairs.append(f"clipped to the {frame_w:g}x{frame_h:g} frame")
    if clipped.area <= 0.0:
        return None, "; ".join([*repairs, "dropped: zero area"])
    return clipped, "; ".join(repairs) or None
