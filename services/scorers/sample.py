"""A small, fully known scoring sample: a drawn scene, one region with its ground truth, 8 candidates.

Used where a representative input is needed without a dataset: ``spr-export-onnx`` traces and checks
parity on it, ``bench/bench_scoring.py`` times it, and the scorer tests build their cases from it.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from spr.v1 import common_pb2, describer_pb2

CIRCLE = common_pb2.Box(x1=20, y1=20, x2=80, y2=80)
SQUARE = common_pb2.Box(x1=110, y1=60, x2=170, y2=120)
REGION_BOX = common_pb2.Box(x1=10, y1=10, x2=180, y2=130)
GROUND_TRUTH = [
    common_pb2.AnnotatedObject(annotation_id=1, category="red circle", box=CIRCLE),
    common_pb2.AnnotatedObject(annotation_id=2, category="blue square", box=SQUARE),
]


def scene_image(width: int = 200, height: int = 150) -> Image.Image:
    """A red circle and a blue square on a light background."""
    image = Image.new("RGB", (width, height), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, 80, 80), fill=(220, 30, 30))
    draw.rectangle((110, 60, 170, 120), fill=(30, 30, 220))
    return image


def scene_png(width: int = 200, height: int = 150) -> bytes:
    """:func:`scene_image` encoded as PNG."""
    buffer = io.BytesIO()
    scene_image(width, height).save(buffer, "PNG")
    return buffer.getvalue()


def sample_region(region_id: str = "region-1", uri: str = "") -> common_pb2.Region:
    """The scene's region with both shapes as ground truth."""
    return common_pb2.Region(
        region_id=region_id,
        image=common_pb2.ImageRef(uri=uri, width=200, height=150),
        box=REGION_BOX,
        members=GROUND_TRUTH,
        ground_truth=GROUND_TRUTH,
    )


def mention(phrase: str, box: common_pb2.Box | None = None) -> common_pb2.Mention:
    """A mention, boxed or not."""
    if box is None:
        return common_pb2.Mention(phrase=phrase)
    return common_pb2.Mention(phrase=phrase, box=box, has_box=True)


def sample_candidates(count: int = 8, region_id: str = "region-1") -> list[describer_pb2.Candidate]:
    """A mix: exact boxes, no boxes (phrases only), no mentions at all, wrong boxes."""
    made = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            mentions = [mention("red circle", CIRCLE), mention("blue square", SQUARE)]
        elif kind == 1:
            mentions = [mention("red circle"), mention(f"blue square number {i}")]
        elif kind == 2:
            mentions = []
        else:
            mentions = [mention("a lamp", common_pb2.Box(x1=150, y1=0, x2=199, y2=20))]
        made.append(
            describer_pb2.Candidate(
                candidate_id=f"{region_id}/{i}",
                sample_index=i,
                text=f"A red circle left of a blue square. Sample {i}.",
                mentions=mentions,
            )
        )
    return made
