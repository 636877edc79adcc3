"""Model families: exact resize, templates, and boxes surviving render -> parse -> full image."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.core.boxes import Box, image_to_frame
from services.core.formats import CoordinateFormat, Mention, mentions_to_image, parse, render, render_box
from services.describer.families import (
    FAMILIES,
    FERRET,
    QWEN2_VL,
    QWEN25_VL,
    FixedResize,
    ModelFamily,
    PromptKind,
    PromptTemplate,
    ResizeError,
    SmartResize,
    object_references,
)
from services.describer.settings import read_pixel_bounds
from spr.v1 import describer_pb2

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def half_bin(fmt: CoordinateFormat, frame_size: int, crop_size: float) -> float:
    """Largest error (image pixels) of one coordinate after rounding to the format's grid."""
    frame_step = (
        1.0
        if fmt is CoordinateFormat.QWEN25_JSON
        else frame_size
        / {
            CoordinateFormat.QWEN2_TOKENS: 1000,
            CoordinateFormat.BRACKET_999: 999,
        }[fmt]
    )
    return 0.5 * frame_step * crop_size / frame_size + 1e-6


# --- smart resize ----------------------------------------------------------------------------------


@FAST
@given(
    width=st.integers(1, 4000),
    height=st.integers(1, 4000),
    bounds=st.sampled_from([(3136, 12544), (3136, 12845056), (256 * 28 * 28, 1280 * 28 * 28)]),
)
def test_smart_resize_matches_transformers(width: int, height: int, bounds: tuple[int, int]) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    resize = SmartResize(min_pixels=bounds[0], max_pixels=bounds[1])
    if max(width, height) / min(width, height) > 200:
        with pytest.raises(ResizeError):
            resize.frame_size(width, height)
        return
    expected_h, expected_w = smart_resize(height, width, 28, bounds[0], bounds[1])
    assert resize.frame_size(width, height) == (expected_w, expected_h)


@FAST
@given(width=st.integers(1, 3000), height=st.integers(1, 3000))
def test_smart_resize_is_a_fixed_point(width: int, height: int) -> None:
    """The processor re-applies smart_resize to our frame: it must not change it."""
    resize = SmartResize(min_pixels=3136, max_pixels=1003520)
    if max(width, height) / min(width, height) > 200:
        return
    frame = resize.frame_size(width, height)
    assert frame[0] % 28 == 0 and frame[1] % 28 == 0
    assert resize.frame_size(*frame) == frame


def test_the_policy_processor_leaves_the_describer_frame_unchanged(tiny_qwen25: Path) -> None:
    """End to end with the real processor class of the tiny policy and its saved pixel bounds."""
    from services.modelzoo.loading import load_policy_processor

    processor = load_policy_processor(tiny_qwen25)
    min_pixels, max_pixels = read_pixel_bounds(tiny_qwen25 / "processor_config.json")
    family = QWEN25_VL.with_pixel_bounds(min_pixels, max_pixels)
    for width, height in [(57, 31), (300, 200), (90, 400), (13, 13)]:
        frame_w, frame_h = family.frame_size(width, height)
        image = Image.new("RGB", (frame_w, frame_h), (10, 200, 30))
        grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        patch = processor.image_processor.patch_size
        assert (int(grid[2]) * patch, int(grid[1]) * patch) == (frame_w, frame_h)


def test_read_pixel_bounds_of_both_layouts(tmp_path: Path, tiny_qwen25: Path) -> None:
    assert read_pixel_bounds(tiny_qwen25 / "processor_config.json") == (3136, 12544)
    flat = tmp_path / "preprocessor_config.json"
    flat.write_text('{"min_pixels": 100, "max_pixels": 2000, "patch_size": 14}')
    assert read_pixel_bounds(flat) == (100, 2000)


def test_fixed_resize_and_bad_sizes() -> None:
    assert FixedResize().frame_size(1000, 20) == (336, 336)
    with pytest.raises(ResizeError):
        FixedResize().frame_size(0, 20)
    with pytest.raises(ResizeError):
        SmartResize().frame_size(10, 3000)  # aspect ratio 300
    with pytest.raises(ValueError):
        FERRET.with_pixel_bounds(10, 20)
    with pytest.raises(ValueError):
        QWEN25_VL.with_pixel_bounds(5000, 4000)


# --- templates -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_every_family_has_one_default_template_per_mode(family: ModelFamily) -> None:
    assert set(family.defaults) == set(PromptKind)
    for kind, template_id in family.defaults.items():
        template = family.template(kind=kind)
        assert template.template_id == template_id == f"{family.template_prefix}/{kind.value}/v1"
        assert template.kind is kind


def test_template_rendering() -> None:
    template = QWEN25_VL.template(kind=PromptKind.CROP_REFS)
    text = template.render(refs=object_references(["red circle", "blue  square", "red circle", ""]))
    assert "It contains: red circle, blue square." in text
    assert '{"bbox_2d": [x1, y1, x2, y2], "label": "<object>"}' in text  # braces survive rendering
    full = QWEN2_VL.template(kind=PromptKind.FULL_BOX)
    box = QWEN2_VL.render_region(Box(10, 20, 30, 40), 100, 100)
    assert box == "<|box_start|>(100,200),(300,400)<|box_end|>"
    assert full.render(box=box).startswith(f"Describe the region {box} of this image")


def test_template_validation_and_lookup() -> None:
    with pytest.raises(ValueError, match="refs"):
        PromptTemplate("x/crop-refs/v2", PromptKind.CROP_REFS, "no placeholder")
    with pytest.raises(ValueError, match="box"):
        PromptTemplate("x/full-box/v2", PromptKind.FULL_BOX, "no placeholder")
    with pytest.raises(KeyError, match="not one of the ferret templates"):
        FERRET.template("qwen25-vl/crop/v1")
    custom = PromptTemplate("ferret/crop/v2", PromptKind.CROP, "What is here? Give boxes.")
    family = FERRET.with_templates([custom], {PromptKind.CROP: "ferret/crop/v2"})
    assert family.template(kind=PromptKind.CROP) is custom
    assert family.template("ferret/crop/v1").kind is PromptKind.CROP
    with pytest.raises(ValueError, match="has mode"):
        FERRET.with_templates([], {PromptKind.CROP: "ferret/full-box/v1"})


def test_prompt_kind_proto_mapping() -> None:
    for kind in PromptKind:
        assert PromptKind.from_proto(kind.proto) is kind
    assert PromptKind.from_proto(describer_pb2.PROMPT_MODE_UNSPECIFIED) is None


# --- boxes: GT in the full image -> the model's frame -> native text -> parsed -> full image --------


@st.composite
def crop_scenes(draw: st.DrawFn) -> tuple[int, int, Box, list[Box]]:
    """An image size, an integer crop inside it, and boxes inside the crop (image pixels)."""
    width, height = draw(st.integers(40, 2000)), draw(st.integers(40, 2000))
    x1, y1 = draw(st.integers(0, width - 20)), draw(st.integers(0, height - 20))
    x2, y2 = draw(st.integers(x1 + 20, width)), draw(st.integers(y1 + 20, height))
    crop = Box(x1, y1, x2, y2)
    boxes = []
    for _ in range(draw(st.integers(1, 4))):
        bx1 = draw(st.floats(x1, x2 - 2))
        by1 = draw(st.floats(y1, y2 - 2))
        bx2 = draw(st.floats(bx1 + 1, x2))
        by2 = draw(st.floats(by1 + 1, y2))
        boxes.append(Box(bx1, by1, bx2, by2))
    return width, height, crop, boxes


@FAST
@given(scene=crop_scenes(), family=st.sampled_from(list(FAMILIES.values())), crop_mode=st.booleans())
def test_boxes_round_trip_through_the_family_format(
    scene: tuple[int, int, Box, list[Box]], family: ModelFamily, crop_mode: bool
) -> None:
    width, height, crop, boxes = scene
    shown = crop if crop_mode else Box(0, 0, width, height)
    if max(shown.width, shown.height) / min(shown.width, shown.height) > 200:
        return
    frame_w, frame_h = family.frame_size(int(shown.width), int(shown.height))
    fmt = family.coordinate_format
    in_frame = [
        Mention(f"thing {i}", image_to_frame(b, shown, frame_w, frame_h)) for i, b in enumerate(boxes)
    ]
    text = render(in_frame, fmt, frame_w, frame_h)
    parsed = parse(text, fmt, frame_w, frame_h)
    back = mentions_to_image(parsed.mentions, shown, frame_w, frame_h)
    got = {m.phrase: m.box for m in back if m.box is not None}
    # A box thinner than one bin may collapse to zero area: dropped, with a warning.
    assert len(got) + len(parsed.warnings) >= len(boxes)
    tol_x = half_bin(fmt, frame_w, shown.width)
    tol_y = half_bin(fmt, frame_h, shown.height)
    assert set(got) <= {f"thing {i}" for i in range(len(boxes))}
    for i, box in enumerate(boxes):
        if f"thing {i}" in got:
            assert _close(box, got[f"thing {i}"], tol_x, tol_y), (box, got[f"thing {i}"])


def _close(a: Box, b: Box, tol_x: float, tol_y: float) -> bool:
    return (
        abs(a.x1 - b.x1) <= tol_x
        and abs(a.x2 - b.x2) <= tol_x
        and abs(a.y1 - b.y1) <= tol_y
        and abs(a.y2 - b.y2) <= tol_y
    )


def test_region_box_rendering_matches_core_render_box() -> None:
    frame = QWEN25_VL.frame_size(640, 480)
    region = image_to_frame(Box(64, 48, 320, 240), Box(0, 0, 640, 480), *frame)
    assert QWEN25_VL.render_region(region, *frame) == render_box(region, CoordinateFormat.QWEN25_JSON, *frame)
    assert FERRET.render_region(Box(0, 0, 168, 336), 336, 336) == "[0, 0, 500, 999]"
