"""Fixtures of the describer tests: the tiny policy model folder, images, settings."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from services.modelzoo.tiny import ensure_model


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """No config file or SPR_DESCRIBER_* variable of the environment leaks into a test."""
    monkeypatch.delenv("SPR_CONFIG_FILE", raising=False)


@pytest.fixture(scope="session")
def tiny_qwen25() -> Path:
    """The tiny Qwen2.5-VL policy (built once, then cached)."""
    return ensure_model("tiny-qwen2.5-vl")


def scene_png(width: int = 200, height: int = 150) -> bytes:
    """A PNG with a red circle and a blue square (what the tiny world looks like)."""
    image = Image.new("RGB", (width, height), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, 80, 80), fill=(220, 30, 30))
    draw.rectangle((110, 60, 170, 120), fill=(30, 30, 220))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
