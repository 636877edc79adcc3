"""The loaders on a GPU: default bf16 on CUDA, weights placed on the device, every model runs there.

Skipped where there is no CUDA (CI, laptops); run on a GPU machine with `pytest tests/modelzoo`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.modelzoo import loading
from services.modelzoo.recipes import sample_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-qwen2-vl"])
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_policy_generates_on_cuda(tiny_models: dict[str, Path], name: str, dtype: str | None) -> None:
    model: Any
    processor: Any
    model, processor = loading.load_policy(tiny_models[name], device="cuda", dtype=dtype)
    assert model.device.type == "cuda"
    assert model.dtype == (torch.bfloat16 if dtype is None else torch.float32)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[sample_image()], return_tensors="pt").to("cuda")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_p=0.9)
    assert out.device.type == "cuda" and out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("name", ["tiny-grounding-dino", "tiny-owlv2"])
def test_detectors_run_in_bf16_on_cuda(tiny_models: dict[str, Path], name: str) -> None:
    model: Any
    processor: Any
    model, processor = loading.load_grounding_model(tiny_models[name], device="cuda")
    assert model.dtype == torch.bfloat16
    image = sample_image()
    target = [(image.height, image.width)]
    if name == "tiny-owlv2":
        inputs = processor(text=[["a red square", "a blue circle"]], images=image, return_tensors="pt")
    else:
        inputs = processor(images=image, text="a red square. a blue circle.", return_tensors="pt")
    # Pixel values must follow the model's dtype; ids and masks stay integers.
    inputs = {
        k: v.to("cuda", model.dtype) if v.is_floating_point() else v.to("cuda") for k, v in inputs.items()
    }
    with torch.inference_mode():
        outputs = model(**inputs)
    if name == "tiny-owlv2":
        results = processor.post_process_grounded_object_detection(
            outputs, threshold=0.0, target_sizes=target
        )
    else:
        results = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=target
        )
    assert results[0]["boxes"].shape[-1] == 4 and torch.isfinite(results[0]["boxes"].float()).all()


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_dual_encoders_run_in_bf16_on_cuda(tiny_models: dict[str, Path], name: str) -> None:
    model: Any
    processor: Any
    model, processor = loading.load_clip(tiny_models[name], device="cuda")
    assert model.dtype == torch.bfloat16
    inputs = processor(
        text=["a red square"], images=sample_image(), padding="max_length", return_tensors="pt"
    )
    with torch.inference_mode():
        image_emb = model.get_image_features(pixel_values=inputs["pixel_values"].to("cuda", torch.bfloat16))
        text_emb = model.get_text_features(input_ids=inputs["input_ids"].to("cuda"))
    assert image_emb.pooler_output.shape == text_emb.pooler_output.shape
    assert image_emb.pooler_output.dtype == torch.bfloat16
