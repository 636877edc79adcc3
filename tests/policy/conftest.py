"""Fixtures for the policy: the tiny Qwen2.5-VL, random LoRA adapters of it, an adapter store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image

from services.adapters.store import AdapterStore
from services.modelzoo.loading import load_policy
from services.modelzoo.tiny import ensure_model
from services.world.scenes import SceneConfig, render_scene
from spr.v1 import adapters_pb2

PublishAdapter = Callable[[int], adapters_pb2.AdapterManifest]


@pytest.fixture(scope="session")
def tiny_policy_path() -> Path:
    return ensure_model("tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def scene_image() -> Image.Image:
    image, _ = render_scene(seed=3, index=0, cfg=SceneConfig())
    return image


def make_lora_adapter(base_path: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved as a standard PEFT folder.

    The trainer makes real ones; here random B matrices make each adapter change the outputs, so a
    test can tell which adapter produced a text.
    """
    model, _ = load_policy(base_path)
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def adapter_store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapter-store")


@pytest.fixture
def publish_adapter(tiny_policy_path: Path, adapter_store: AdapterStore, tmp_path: Path) -> PublishAdapter:
    """Publish a random adapter (by seed) into the store; returns its manifest."""

    def publish(seed: int) -> adapters_pb2.AdapterManifest:
        folder = make_lora_adapter(tiny_policy_path, tmp_path / f"lora-{seed}", seed)
        manifest = adapters_pb2.AdapterManifest(base_model_id=str(tiny_policy_path))
        return adapter_store.publish(folder, manifest, round_index=seed)

    return publish
