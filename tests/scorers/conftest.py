"""Fixtures of the scorer tests: a drawn scene, its region and GT, tiny models and their ONNX exports."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from services.modelzoo.tiny import ensure_model
from services.scorers.onnx_export import Parity, export
from spr.v1 import common_pb2, describer_pb2

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled MiniLM and the tiny models are local

CIRCLE = common_pb2.Box(x1=20, y1=20, x2=80, y2=80)
SQUARE = common_pb2.Box(x1=110, y1=60, x2=170, y2=120)
REGION_BOX = common_pb2.Box(x1=10, y1=10, x2=180, y2=130)
GT = [
    common_pb2.AnnotatedObject(annotation_id=1, category="red circle", box=CIRCLE),
    common_pb2.AnnotatedObject(annotation_id=2, category="blue square", box=SQUARE),
]
GROUNDING_MODELS = ("tiny-grounding-dino", "tiny-owlv2")
ENCODER_MODELS = ("tiny-clip", "tiny-siglip")


def scene_png(width: int = 200, height: int = 150) -> bytes:
    """A PNG with a red circle and a blue square."""
    image = Image.new("RGB", (width, height), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, 80, 80), fill=(220, 30, 30))
    draw.rectangle((110, 60, 170, 120), fill=(30, 30, 220))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_region(region_id: str = "region-1", uri: str = "") -> common_pb2.Region:
    """The scene's region with both shapes as ground truth."""
    return common_pb2.Region(
        region_id=region_id,
        image=common_pb2.ImageRef(uri=uri, width=200, height=150),
        box=REGION_BOX,
        members=GT,
        ground_truth=GT,
    )


def mention(phrase: str, box: common_pb2.Box | None = None) -> common_pb2.Mention:
    """A mention, boxed or not."""
    if box is None:
        return common_pb2.Mention(phrase=phrase)
    return common_pb2.Mention(phrase=phrase, box=box, has_box=True)


def candidates(count: int = 8) -> list[describer_pb2.Candidate]:
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
                candidate_id=f"region-1/{i}",
                sample_index=i,
                text=f"A red circle left of a blue square. Sample {i}.",
                mentions=mentions,
            )
        )
    return made


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Every tiny model the scorers support (built once, then cached)."""
    return {name: ensure_model(name) for name in (*GROUNDING_MODELS, *ENCODER_MODELS)}


@pytest.fixture(scope="session")
def onnx_exports(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, list[Parity]]]:
    """Every tiny model exported with spr-export-onnx's code, with its parity report."""
    root = tmp_path_factory.mktemp("onnx")
    return {name: (root / name, export(path, root / name)) for name, path in tiny_models.items()}
