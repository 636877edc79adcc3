"""Fixtures of the describer tests: the tiny policy model folder, images, settings."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from services.devstack.triton import TritonServer
from services.modelzoo.tiny import ensure_model

POLICY_REPO = Path(__file__).resolve().parents[2] / "services" / "policy" / "model_repository"


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


@pytest.fixture(scope="session")
def triton(triton_server: Callable[..., TritonServer], tiny_qwen25: Path) -> Iterator[TritonServer]:
    """The describer tests' own tritonserver with spr_policy on the tiny Qwen2.5-VL.

    Private (``fresh``) because the outage test stops and restarts it. The model finds its weights
    through ``SPR_POLICY_MODEL_PATH`` in the server's environment, copied from ours at each start
    (so a restart must set it again).
    """
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SPR_POLICY_MODEL_PATH", str(tiny_qwen25))
        server = triton_server(POLICY_REPO, models=["spr_policy"], fresh=True)
    yield server
