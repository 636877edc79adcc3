"""The Describer core without Triton: validation, the frame the model sees, parsing into full-image pixels."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from services.common import errors
from services.core.boxes import Box, image_to_frame
from services.core.formats import CoordinateFormat, Mention, render
from services.describer.errors import TemplateUnknown, TooManySamples
from services.describer.families import PromptKind, SmartResize
from services.describer.logic import Describer
from services.describer.settings import DescriberSettings
from services.describer.triton_client import PolicyOutput
from services.devstack.process import free_port
from spr.v1 import common_pb2, describer_pb2
from tests.describer.conftest import scene_png

REGION = common_pb2.Box(x1=10.5, y1=12, x2=95, y2=90)  # the red circle, with a fractional edge


def make_settings(**overrides: Any) -> DescriberSettings:
    values: dict[str, Any] = {
        "port": 0,
        "metrics_port": 0,
        "triton_url": f"127.0.0.1:{free_port()}",  # nothing listens: these tests never reach Triton
        "retry": {"max_attempts": 2, "initial_backoff_s": 0.01},
    }
    values.update(overrides)
    return DescriberSettings(**values)


@pytest.fixture
def describer() -> Iterator[Describer]:
    d = Describer(make_settings(min_pixels=3136, max_pixels=12544))
    yield d
    d.close()


def request(**fields: Any) -> describer_pb2.DescribeRegionRequest:
    values: dict[str, Any] = {"image_bytes": scene_png(), "region": REGION}
    values.update(fields)
    return describer_pb2.DescribeRegionRequest(**values)


# --- the prepared request -------------------------------------------------------------------------


def test_crop_mode_sends_the_integer_crop_resized_to_a_processor_fixed_point(describer: Describer) -> None:
    prepared = describer.prepare(request(sampling=common_pb2.SamplingParams(num_samples=3)))
    assert prepared.crop_box == Box(10, 12, 95, 90)  # floor/ceil of the region: every touched pixel
    assert (prepared.frame_width, prepared.frame_height) == describer.family.frame_size(85, 78)
    assert prepared.frame_width % 28 == 0 and prepared.frame_width * prepared.frame_height <= 12544
    with Image.open(io.BytesIO(prepared.policy_request.image)) as frame:
        assert frame.size == (prepared.frame_width, prepared.frame_height)
        assert frame.format == "PNG"
    assert prepared.template.template_id == "qwen25-vl/crop/v1"
    assert prepared.instruction == prepared.template.text
    sampling = prepared.policy_request.sampling
    assert (sampling.num_samples, sampling.temperature, sampling.top_p, sampling.seed) == (3, 1.0, 0.9, None)
    # A request without region_id gets a deterministic one: same image and box, same id.
    assert prepared.region_id == describer.prepare(request()).region_id
    assert (
        prepared.region_id
        != describer.prepare(request(region=common_pb2.Box(x1=0, y1=0, x2=50, y2=50))).region_id
    )


def test_full_image_mode_writes_the_region_in_the_frame_format(describer: Describer) -> None:
    prepared = describer.prepare(
        request(prompt_mode=describer_pb2.PROMPT_MODE_FULL_IMAGE_BOX, region_id="r1")
    )
    assert prepared.crop_box == Box(0, 0, 200, 150)
    fw, fh = prepared.frame_width, prepared.frame_height
    region_in_frame = image_to_frame(Box(10.5, 12, 95, 90), prepared.crop_box, fw, fh)
    expected = "[" + ", ".join(str(round(v)) for v in region_in_frame.as_tuple()) + "]"
    assert prepared.instruction.startswith(f"Describe the region {expected} of this image")
    assert prepared.template.template_id == "qwen25-vl/full-box/v1"
    assert prepared.region_id == "r1"


def test_object_references_come_from_the_request(describer: Describer) -> None:
    refs = [
        common_pb2.AnnotatedObject(category="red circle"),
        common_pb2.AnnotatedObject(category="blue square"),
        common_pb2.AnnotatedObject(category="red circle"),
    ]
    prepared = describer.prepare(
        request(prompt_mode=describer_pb2.PROMPT_MODE_CROP_WITH_REFS, object_refs=refs)
    )
    assert "It contains: red circle, blue square." in prepared.instruction
    with pytest.raises(errors.InvalidRequest, match="object_refs"):
        describer.prepare(request(prompt_mode=describer_pb2.PROMPT_MODE_CROP_WITH_REFS))


def test_templates_by_id_and_configured_defaults() -> None:
    custom = {"template_id": "qwen25-vl/crop/custom", "mode": "crop", "text": "List the objects with boxes."}
    d = Describer(
        make_settings(extra_templates=[custom], default_templates={"crop": "qwen25-vl/crop/custom"})
    )
    try:
        assert d.prepare(request()).instruction == "List the objects with boxes."
        assert d.prepare(request(template_id="qwen25-vl/crop/v1")).template.template_id == "qwen25-vl/crop/v1"
        with pytest.raises(TemplateUnknown):
            d.prepare(request(template_id="ferret/crop/v1"))
        with pytest.raises(errors.InvalidRequest, match="prompt_mode"):
            d.prepare(
                request(template_id="qwen25-vl/crop/v1", prompt_mode=describer_pb2.PROMPT_MODE_FULL_IMAGE_BOX)
            )
    finally:
        d.close()


def test_settings_read_pixel_bounds_from_the_processor_config(tiny_qwen25: Path) -> None:
    config = tiny_qwen25 / "processor_config.json"
    assert make_settings(processor_config=config).family().resize == SmartResize(
        min_pixels=3136, max_pixels=12544
    )
    explicit = make_settings(processor_config=config, max_pixels=6272).family().resize  # explicit wins
    assert explicit == SmartResize(min_pixels=3136, max_pixels=6272)


def test_bad_settings_fail_at_start() -> None:
    with pytest.raises(ValueError, match="unknown model family"):
        make_settings(model_family="gpt-vision")
    with pytest.raises(ValueError, match="num_samples"):
        make_settings(max_num_samples=4)  # default N = 8 above the cap
    with pytest.raises(ValueError, match="must contain"):
        make_settings(extra_templates=[{"template_id": "t", "mode": "full-box", "text": "no box"}])


# --- bad input: each gets its own typed error (and so its gRPC status) ----------------------------


def _bomb_png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"image_bytes": b"definitely not an image"}, errors.ImageUndecodable),
        ({"image_bytes": scene_png()[:200]}, errors.ImageTruncated),
        ({"image_bytes": _bomb_png(50_000, 50_000)}, errors.ImageTooManyPixels),
        ({"region": common_pb2.Box(x1=150, y1=100, x2=260, y2=140)}, errors.RegionOutOfBounds),
        ({"region": common_pb2.Box(x1=50, y1=50, x2=40, y2=60)}, errors.RegionInvalid),
        ({"sampling": common_pb2.SamplingParams(num_samples=17)}, TooManySamples),
        ({"sampling": common_pb2.SamplingParams(num_samples=-1)}, errors.InvalidRequest),
        ({"sampling": common_pb2.SamplingParams(temperature=-1)}, errors.InvalidRequest),
        ({"sampling": common_pb2.SamplingParams(top_p=1.5)}, errors.InvalidRequest),
        ({"sampling": common_pb2.SamplingParams(max_new_tokens=5000)}, errors.InvalidRequest),
        ({"template_id": "nope/crop/v1"}, TemplateUnknown),
        ({"prompt_mode": 9}, errors.InvalidRequest),
        ({"image_uri": "/no/such/image.png"}, errors.ImageNotFound),
        ({"image_uri": "http://169.254.169.254/latest"}, errors.ImageUriUnsupported),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_bad_input_raises_its_specific_error(
    describer: Describer, fields: dict[str, Any], error: type
) -> None:
    with pytest.raises(error) as caught:
        describer.prepare(request(**fields))
    assert type(caught.value) is error


def test_missing_image_or_region() -> None:
    d = Describer(make_settings())
    try:
        with pytest.raises(errors.InvalidRequest, match="image"):
            d.prepare(describer_pb2.DescribeRegionRequest(region=REGION))
        with pytest.raises(errors.InvalidRequest, match="region"):
            d.prepare(describer_pb2.DescribeRegionRequest(image_bytes=scene_png()))
    finally:
        d.close()


def test_images_by_uri_are_checked_against_their_sha256(describer: Describer, tmp_path: Path) -> None:
    path = tmp_path / "scene.png"
    path.write_bytes(scene_png())
    import hashlib

    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert describer.prepare(request(image_uri=path.as_uri()), expected_sha256=good).crop_box == Box(
        10, 12, 95, 90
    )
    with pytest.raises(errors.ImageChecksumMismatch):
        describer.prepare(request(image_uri=path.as_uri()), expected_sha256="0" * 64)


# --- parsing the answer ---------------------------------------------------------------------------

GT = [Box(20, 20, 80, 80), Box(60, 30, 95, 88.5)]  # full-image pixels, inside the region crop


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl", "ferret"])
@pytest.mark.parametrize("mode", [describer_pb2.PROMPT_MODE_CROP, describer_pb2.PROMPT_MODE_FULL_IMAGE_BOX])
def test_candidates_carry_mentions_in_full_image_pixels(family: str, mode: int) -> None:
    bounds = {"min_pixels": 3136, "max_pixels": 12544} if family != "ferret" else {}
    d = Describer(make_settings(model_family=family, **bounds))
    try:
        prepared = d.prepare(request(prompt_mode=mode, region_id="region-7"))
        fw, fh = prepared.frame_width, prepared.frame_height
        fmt = d.family.coordinate_format
        mentions = [
            Mention(f"shape {i}", image_to_frame(b, prepared.crop_box, fw, fh)) for i, b in enumerate(GT)
        ]
        texts = [
            render(mentions, fmt, fw, fh),
            "no boxes at all",
            '[{"bbox_2d": [1, 2, 3], "label": "x"}] [1, 2, 3]',
        ]
        output = PolicyOutput(
            texts=texts, token_logprobs=[[-0.5, -0.25], [], [-1.0]], adapter_version="spr-v3-abc"
        )
        description = d.build(prepared, output)
    finally:
        d.close()
    first, empty, broken = description.candidates
    assert [m.phrase for m in first.mentions] == ["shape 0", "shape 1"]
    step_x = prepared.crop_box.width / fw * (1.0 if fmt is CoordinateFormat.QWEN25_JSON else fw / 999)
    step_y = prepared.crop_box.height / fh * (1.0 if fmt is CoordinateFormat.QWEN25_JSON else fh / 999)
    for mention, gt in zip(first.mentions, GT, strict=True):
        assert mention.has_box
        assert (
            abs(mention.box.x1 - gt.x1) <= step_x / 2 + 1e-6
            and abs(mention.box.x2 - gt.x2) <= step_x / 2 + 1e-6
        )
        assert (
            abs(mention.box.y1 - gt.y1) <= step_y / 2 + 1e-6
            and abs(mention.box.y2 - gt.y2) <= step_y / 2 + 1e-6
        )
        assert first.text[mention.char_start : mention.char_end]  # the span of the box markup
    assert first.coordinate_format == fmt.value
    assert list(first.token_logprobs) == [-0.5, -0.25]
    assert not any(m.has_box for m in empty.mentions) and not empty.parse_warnings
    assert [c.sample_index for c in description.candidates] == [0, 1, 2]
    assert len({c.candidate_id for c in description.candidates}) == 3
    lineage = description.lineage
    assert (lineage.adapter_version, lineage.prompt_template_id) == (
        "spr-v3-abc",
        prepared.template.template_id,
    )
    assert lineage.policy_model_id == "Qwen/Qwen2.5-VL-7B-Instruct"
    responses = list(description.responses())
    assert [r.candidate for r in responses] == description.candidates
    assert all(r.lineage == lineage for r in responses)
    if fmt is not CoordinateFormat.QWEN2_TOKENS:
        assert broken.parse_warnings  # "not four numbers": kept as a candidate, with the reason


def test_candidate_ids_are_stable_across_retries(describer: Describer) -> None:
    output = PolicyOutput(texts=["a", "b"], token_logprobs=[[], []], adapter_version="")
    first = describer.build(describer.prepare(request(region_id="r")), output)
    again = describer.build(describer.prepare(request(region_id="r")), output)
    other = describer.build(
        describer.prepare(request(region_id="r")), PolicyOutput(["a", "b"], [[], []], "v2")
    )
    assert [c.candidate_id for c in first.candidates] == [c.candidate_id for c in again.candidates]
    assert first.candidates[0].candidate_id != other.candidates[0].candidate_id  # another adapter
    redrawn = describer.build(
        describer.prepare(request(region_id="r")), PolicyOutput(["c", "b"], [[], []], "")
    )
    assert redrawn.candidates[0].candidate_id != first.candidates[0].candidate_id  # another text
    assert redrawn.candidates[1].candidate_id == first.candidates[1].candidate_id


def test_stage_prompt_modes_rotate_per_region_and_need_members(describer: Describer) -> None:
    regions = [
        common_pb2.Region(region_id=f"r{i}", members=[common_pb2.AnnotatedObject(category="cat")])
        for i in range(60)
    ]
    kinds = [describer.stage_prompt_kind(r) for r in regions]
    assert set(kinds) == set(PromptKind)
    assert kinds == [describer.stage_prompt_kind(r) for r in regions]  # stable per region id
    bare = [common_pb2.Region(region_id=f"r{i}") for i in range(60)]
    assert PromptKind.CROP_REFS not in {describer.stage_prompt_kind(r) for r in bare}
