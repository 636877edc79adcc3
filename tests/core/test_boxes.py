from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core import (
    BINS_FERRET,
    BINS_QWEN2,
    Box,
    boxes_to_array,
    frame_to_image,
    frame_to_image_array,
    from_bins,
    from_normalized,
    image_to_frame,
    sanitize_box,
    to_bins,
    to_normalized,
)

from .strategies import FAST, THOROUGH, boxes_in, frame_sizes


def test_box_geometry() -> None:
    box = Box(10, 20, 40, 60)
    assert (box.width, box.height, box.area, box.center) == (30, 40, 1200, (25, 40))
    assert Box.from_xywh(*box.to_xywh()) == box
    assert box.union(Box(0, 50, 15, 70)) == Box(0, 20, 40, 70)
    assert box.intersection_area(Box(30, 50, 100, 100)) == 100
    assert box.intersection_area(Box(50, 50, 60, 60)) == 0
    assert Box(5, 5, 1, 1).area == 0  # inverted boxes have no negative area
    assert box.pad(0.5) == Box(-5, 0, 55, 80)
    assert box.clip(35, 50) == Box(10, 20, 35, 50)


def test_boxes_to_array_shapes() -> None:
    assert boxes_to_array([]).shape == (0, 4)
    assert boxes_to_array([Box(1, 2, 3, 4)]).tolist() == [[1, 2, 3, 4]]


@THOROUGH
@given(st.data(), frame_sizes, frame_sizes)
def test_pixels_normalized_round_trip_is_exact(data: st.DataObject, frame_w: int, frame_h: int) -> None:
    box = data.draw(boxes_in(frame_w, frame_h))
    back = from_normalized(to_normalized(box, frame_w, frame_h), frame_w, frame_h)
    assert back.as_tuple() == pytest.approx(box.as_tuple(), abs=1e-9)


@THOROUGH
@given(st.data(), frame_sizes, frame_sizes, st.sampled_from([BINS_FERRET, BINS_QWEN2]))
def test_pixels_bins_pixels_within_half_a_bin(
    data: st.DataObject, frame_w: int, frame_h: int, bins: int
) -> None:
    box = data.draw(boxes_in(frame_w, frame_h))
    quantized = to_bins(box, frame_w, frame_h, bins)
    assert all(0 <= b <= bins for b in quantized)
    back = from_bins(quantized, frame_w, frame_h, bins)
    half_bin = (frame_w / bins / 2, frame_h / bins / 2)
    for axis, (got, want) in enumerate(zip(back.as_tuple(), box.as_tuple(), strict=True)):
        assert abs(got - want) <= half_bin[axis % 2] + 1e-9


@FAST
@given(st.tuples(*[st.integers(0, 999)] * 4), frame_sizes, frame_sizes)
def test_bins_pixels_bins_is_identity(bins: tuple[int, int, int, int], frame_w: int, frame_h: int) -> None:
    assert to_bins(from_bins(bins, frame_w, frame_h, BINS_FERRET), frame_w, frame_h, BINS_FERRET) == bins


def test_bin_convention_edges() -> None:
    assert to_bins(Box(0, 0, 640, 480), 640, 480, BINS_FERRET) == (0, 0, 999, 999)
    assert to_bins(Box(0, 0, 640, 480), 640, 480, BINS_QWEN2) == (0, 0, 1000, 1000)
    assert from_bins((500, 500, 1000, 1000), 640, 480, BINS_QWEN2) == Box(320, 240, 640, 480)


def test_crop_frames() -> None:
    crop = Box(100, 50, 300, 150)  # 200 x 100 region
    assert frame_to_image(Box(0, 0, 200, 100), crop, 200, 100) == crop
    # The same crop shown to the model resized to 400 x 200.
    assert frame_to_image(Box(0, 0, 400, 200), crop, 400, 200) == crop
    assert image_to_frame(Box(150, 100, 200, 150), crop, 400, 200) == Box(100, 100, 200, 200)
    assert frame_to_image(Box(1, 2, 3, 4), None, 10, 10) == Box(1, 2, 3, 4)


@FAST
@given(st.data(), frame_sizes, frame_sizes)
def test_frame_and_image_are_inverse(data: st.DataObject, frame_w: int, frame_h: int) -> None:
    crop = data.draw(boxes_in(5000, 5000, min_side=1.0))
    box = data.draw(boxes_in(frame_w, frame_h))
    there_and_back = image_to_frame(frame_to_image(box, crop, frame_w, frame_h), crop, frame_w, frame_h)
    assert there_and_back.as_tuple() == pytest.approx(box.as_tuple(), abs=1e-6)


@pytest.mark.parametrize(
    ("coords", "expected", "reason_part"),
    [
        ((10, 20, 30, 40), Box(10, 20, 30, 40), None),
        ((30, 40, 10, 20), Box(10, 20, 30, 40), "swapped"),
        ((-5, 20, 130, 40), Box(0, 20, 100, 40), "clipped"),
        ((40, 20, -5, 40), Box(0, 20, 40, 40), "swapped inverted corners; clipped"),
        ((math.nan, 1, 2, 3), None, "non-finite"),
        ((0, math.inf, 2, 3), None, "non-finite"),
        ((10, 10, 10, 40), None, "zero area"),
        ((150, 150, 200, 200), None, "clipped to the 100x100 frame; dropped: zero area"),
        ((10**400, 1, 2, 3), None, "not a number"),
    ],
)
def test_sanitize_box_repairs_or_drops(
    coords: tuple[float, float, float, float], expected: Box | None, reason_part: str | None
) -> None:
    box, reason = sanitize_box(*coords, 100, 100)
    assert box == expected
    if reason_part is None:
        assert reason is None
    else:
        assert reason is not None and reason_part in reason


def test_sanitize_box_rejects_an_unusable_frame() -> None:
    assert sanitize_box(1, 1, 2, 2, 0, 10) == (None, "dropped: unusable frame 0.0x10.0")


@THOROUGH
@given(st.tuples(*[st.floats(allow_nan=True, allow_infinity=True)] * 4), frame_sizes, frame_sizes)
def test_sanitize_box_never_raises_and_returns_a_usable_box(
    coords: tuple[float, float, float, float], frame_w: int, frame_h: int
) -> None:
    box, reason = sanitize_box(*coords, frame_w, frame_h)
    if box is None:
        assert reason is not None and "dropped" in reason
    else:
        assert 0 <= box.x1 < box.x2 <= frame_w and 0 <= box.y1 < box.y2 <= frame_h


@FAST
@given(st.data(), frame_sizes, frame_sizes)
def test_array_frame_transform_matches_the_box_one(data: st.DataObject, frame_w: int, frame_h: int) -> None:
    crop = data.draw(st.none() | boxes_in(5000, 5000, min_side=1.0))
    boxes = data.draw(st.lists(boxes_in(frame_w, frame_h), max_size=5))
    moved = frame_to_image_array(boxes_to_array(iter(boxes)), crop, frame_w, frame_h)
    expected = boxes_to_array(frame_to_image(b, crop, frame_w, frame_h) for b in boxes)
    np.testing.assert_allclose(moved, expected, rtol=1e-12, atol=1e-9)
