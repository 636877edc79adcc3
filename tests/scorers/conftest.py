"""Fixtures of the scorer tests: a drawn scene, its region and GT, tiny models and their ONNX exports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.modelzoo.tiny import ensure_model
from services.scorers.onnx_export import Parity, export
from services.scorers.sample import (
    CIRCLE,
    GROUND_TRUTH,
    REGION_BOX,
    SQUARE,
    mention,
    sample_candidates,
    sample_region,
    scene_png,
)
from spr.v1 import common_pb2, describer_pb2

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled MiniLM and the tiny models are local

GT = GROUND_TRUTH
GROUNDING_MODELS = ("tiny-grounding-dino", "tiny-owlv2")
ENCODER_MODELS = ("tiny-clip", "tiny-siglip")


def make_region(region_id: str = "region-1", uri: str = "") -> common_pb2.Region:
    """The sample scene's region with both shapes as ground truth."""
    return sample_region(region_id, uri)


def candidates(count: int = 8) -> list[describer_pb2.Candidate]:
    """The sample candidates (exact, unboxed, mention-less and wrong ones)."""
    return sample_candidates(count)


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


__all__ = ["CIRCLE", "GT", "REGION_BOX", "SQUARE", "candidates", "make_region", "mention", "scene_png"]
