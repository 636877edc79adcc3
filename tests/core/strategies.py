"""Hypothesis strategies and settings shared by the core tests."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from services.core import AnnotatedBox, Box, CoordinateFormat

# Numpy's first call and big generated texts can be slow; examples are capped to keep the suite fast.
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Grid step of each format in units of the frame size: the "one bin" of the round-trip tolerance.
BIN_FRACTION = {
    CoordinateFormat.QWEN2_TOKENS: 1 / 1000,
    CoordinateFormat.BRACKET_999: 1 / 999,
    CoordinateFormat.BRACKET_FLOAT: 1 / 1000,
}


def one_bin(fmt: CoordinateFormat, size: float) -> float:
    """Pixels of one grid step along an axis of ``size`` pixels (Qwen2.5-VL: one pixel)."""
    return 1.0 if fmt is CoordinateFormat.QWEN25_JSON else BIN_FRACTION[fmt] * size


frame_sizes = st.integers(min_value=16, max_value=4096)

# Words that the bracket parser keeps in a noun phrase (no articles, no linking words).
NOUN_WORDS = ["dog", "cat", "red", "small", "car", "tree", "person", "bicycle", "striped", "umbrella"]
phrases = st.lists(st.sampled_from(NOUN_WORDS), min_size=1, max_size=3).map(" ".join)


@st.composite
def boxes_in(draw: st.DrawFn, frame_w: float, frame_h: float, min_side: float = 0.0) -> Box:
    """A box inside the frame whose sides are at least ``min_side`` pixels."""
    w = draw(st.floats(min_value=min_side, max_value=frame_w, allow_nan=False))
    h = draw(st.floats(min_value=min_side, max_value=frame_h, allow_nan=False))
    x1 = draw(st.floats(min_value=0.0, max_value=frame_w - w, allow_nan=False))
    y1 = draw(st.floats(min_value=0.0, max_value=frame_h - h, allow_nan=False))
    return Box(x1, y1, min(x1 + w, frame_w), min(y1 + h, frame_h))


@st.composite
def grid_boxes(draw: st.DrawFn, frame_w: int, frame_h: int) -> Box:
    """A box with integer corners and positive area inside a frame of integer size."""
    x1 = draw(st.integers(0, frame_w - 1))
    y1 = draw(st.integers(0, frame_h - 1))
    x2 = draw(st.integers(x1 + 1, frame_w))
    y2 = draw(st.integers(y1 + 1, frame_h))
    return Box(x1, y1, x2, y2)


@st.composite
def annotated_objects(draw: st.DrawFn, image_w: int, image_h: int, max_size: int = 12) -> list[AnnotatedBox]:
    boxes = draw(st.lists(grid_boxes(image_w, image_h), min_size=1, max_size=max_size))
    return [AnnotatedBox(i + 1, f"category{i % 3}", box) for i, box in enumerate(boxes)]
