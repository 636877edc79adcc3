"""Shared fixtures of the trainer tests: a tiny policy, images on disk, preference pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from services.modelzoo.tiny import ensure_model
from spr.v1 import common_pb2, describer_pb2, pairs_pb2
from trainer.config import TrainerConfig


@pytest.fixture(scope="session")
def tiny_policy() -> Path:
    return ensure_model("tiny-qwen2.5-vl")


def make_pairs(
    folder: Path, n: int, run_id: str = "run-1", size: tuple[int, int] = (64, 48)
) -> list[pairs_pb2.PreferencePair]:
    """`n` pairs over distinct `size` images (64x48 by default); crop and full-image prompts alternate.

    The region box scales with the image, so bigger images give proportionally more image tokens.
    """
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    sx, sy = width / 64, height / 48
    pairs = []
    for i in range(n):
        path = folder / f"img-{i}.png"
        Image.new("RGB", size, (30 * i % 255, 100, 200)).save(path)
        mode = describer_pb2.PROMPT_MODE_CROP if i % 2 else describer_pb2.PROMPT_MODE_FULL_IMAGE_BOX
        region = common_pb2.Region(
            region_id=f"r{i}",
            image=common_pb2.ImageRef(uri=path.as_uri(), width=width, height=height),
            box=common_pb2.Box(x1=4.5 * sx, y1=2 * sy, x2=40 * sx, y2=30.2 * sy),
        )
        pairs.append(
            pairs_pb2.PreferencePair(
                pair_id=f"{run_id}-r{i}",
                region_id=f"r{i}",
                region=region,
                prompt=f"Describe region {i} with boxes.",
                prompt_mode=mode,
                chosen=pairs_pb2.ScoredText(
                    text=f'[{{"bbox_2d": [1, 2, 30, 20], "label": "cat {i}"}}]', reward=0.9
                ),
                rejected=pairs_pb2.ScoredText(text="a dog", reward=0.2),
                margin=0.7,
                lineage=common_pb2.Lineage(run_id=run_id),
            )
        )
    return pairs


def small_config(tiny_policy: Path, tmp: Path, **overrides: object) -> TrainerConfig:
    """Tiny LoRA, two optimizer steps at most: seconds on 2 cores."""
    values: dict[str, object] = {
        "base_model": str(tiny_policy),
        "store": str(tmp / "store"),
        "work_dir": str(tmp / "work"),
        "lora_r": 4,
        "lora_alpha": 8,
        "learning_rate": 1e-3,
        "batch_size": 2,
        "max_steps": 2,
        "heldout_fraction": 0.25,
        "min_pairs": 2,
        "poll_idle_s": 3.0,
        "device": "cpu",
    }
    values.update(overrides)
    return TrainerConfig(**values)  # type: ignore[arg-type]
