"""The production loaders on the tiny models: the code paths serving, scorers and the trainer use."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    GroundingDinoImageProcessorPil,
    Owlv2ImageProcessorPil,
    Qwen2VLImageProcessorPil,
    SiglipImageProcessorPil,
)

from services.modelzoo import loading
from services.modelzoo.recipes import sample_image

POLICIES = ["tiny-qwen2.5-vl", "tiny-qwen2-vl"]
POLICY_CLASSES = {"tiny-qwen2.5-vl": "Qwen2_5_VL", "tiny-qwen2-vl": "Qwen2VL"}


def _image_prompt(processor: Any, text: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt: str = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt


def test_resolve_dtype_defaults_by_device() -> None:
    assert loading.resolve_dtype(None, torch.device("cpu")) is torch.float32
    assert loading.resolve_dtype(None, torch.device("cuda")) is torch.bfloat16
    assert loading.resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert loading.resolve_dtype("torch.float16", torch.device("cpu")) is torch.float16
    assert loading.resolve_dtype(torch.float64, torch.device("cpu")) is torch.float64
    with pytest.raises(ValueError):
        loading.resolve_dtype("float33", torch.device("cpu"))
    with pytest.raises(ValueError):
        loading.resolve_dtype("nn", torch.device("cpu"))  # an attribute of torch, not a dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_request_without_cuda_fails_early() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        loading.resolve_device("cuda")


@pytest.mark.parametrize("name", POLICIES)
def test_load_policy_generates_from_an_image(tiny_models: dict[str, Path], name: str) -> None:
    model: Any
    processor: Any
    model, processor = loading.load_policy(tiny_models[name])
    assert type(model).__name__ == f"{POLICY_CLASSES[name]}ForConditionalGeneration"
    assert type(processor).__name__ == f"{POLICY_CLASSES[name]}Processor"
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert not hasattr(processor, "video_processor")
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training

    prompt = _image_prompt(processor, "Describe the region.")
    assert prompt.count("<|image_pad|>") == 1
    inputs = processor(text=[prompt], images=[sample_image()], return_tensors="pt")
    # 112x84 px -> 8x6 patches of 14 px -> 12 tokens after the 2x2 merge.
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 12
    prompt_length = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 1 and prompt_length < out.shape[1] <= prompt_length + 6
    assert isinstance(processor.batch_decode(out[:, prompt_length:], skip_special_tokens=False)[0], str)


def test_policy_batched_generation_with_left_padding(tiny_models: dict[str, Path]) -> None:
    model: Any
    processor: Any
    model, processor = loading.load_policy(tiny_models["tiny-qwen2.5-vl"])
    processor.tokenizer.padding_side = "left"  # what batched serving sets: generation continues on the right
    prompts = [_image_prompt(processor, "Describe."), _image_prompt(processor, "Describe the small red car.")]
    images = [sample_image(112, 84), sample_image(56, 56)]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    assert inputs["attention_mask"][0, 0] == 0 or inputs["attention_mask"][1, 0] == 0
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=True, temperature=1.0, top_p=0.9)
    assert out.shape[0] == 2


def test_policy_loads_in_bfloat16(tiny_models: dict[str, Path]) -> None:
    model: Any
    processor: Any
    model, processor = loading.load_policy(tiny_models["tiny-qwen2.5-vl"], dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    inputs = processor(text=[_image_prompt(processor, "Hi")], images=[sample_image()], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_policy_processor_saves_standard_files_and_pickles(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    processor = loading.load_policy_processor(tiny_models["tiny-qwen2.5-vl"])
    processor.save_pretrained(tmp_path)
    # The saved folder names the stock classes, so it loads anywhere (e.g. next to a PEFT adapter).
    assert '"processor_class": "Qwen2_5_VLProcessor"' in (tmp_path / "processor_config.json").read_text()
    assert '"processor_class": "Qwen2_5_VLProcessor"' in (tmp_path / "tokenizer_config.json").read_text()
    copy = pickle.loads(pickle.dumps(processor))
    assert type(copy) is type(processor)
    reloaded = loading.load_policy_processor(tmp_path)
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert reloaded.chat_template == processor.chat_template


def test_load_grounding_dino_detects_phrases(tiny_models: dict[str, Path]) -> None:
    model: Any
    processor: Any
    model, processor = loading.load_grounding_model(tiny_models["tiny-grounding-dino"])
    assert type(model).__name__ == "GroundingDinoForObjectDetection"
    assert isinstance(processor.image_processor, GroundingDinoImageProcessorPil)
    image = sample_image()
    inputs = processor(images=image, text="a red square. a blue circle.", return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**inputs)
    assert outputs.logits.shape[:2] == (1, model.config.num_queries)
    results = processor.post_process_grounded_object_detection(
        outputs,
        inputs["input_ids"],
        threshold=0.0,
        text_threshold=0.0,
        target_sizes=[(image.height, image.width)],
    )
    boxes = results[0]["boxes"]
    assert boxes.shape == (model.config.num_queries, 4)
    assert len(results[0]["text_labels"]) == model.config.num_queries
    assert all(isinstance(label, str) for label in results[0]["text_labels"])


def test_load_owlv2_detects_queries(tiny_models: dict[str, Path]) -> None:
    model: Any
    processor: Any
    model, processor = loading.load_grounding_model(tiny_models["tiny-owlv2"])
    assert type(model).__name__ == "Owlv2ForObjectDetection"
    assert isinstance(processor.image_processor, Owlv2ImageProcessorPil)
    image = sample_image()
    inputs = processor(text=[["a red square", "a blue circle"]], images=image, return_tensors="pt")
    assert inputs["input_ids"].shape == (2, 16)  # OWL pads every query to 16 tokens
    with torch.inference_mode():
        outputs = model(**inputs)
    n_boxes = (96 // 16) ** 2
    assert outputs.logits.shape == (1, n_boxes, 2)
    target = [(image.height, image.width)]
    grounded = processor.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=target)
    plain = processor.image_processor.post_process_object_detection(
        outputs, threshold=0.0, target_sizes=target
    )
    assert grounded[0]["boxes"].shape == plain[0]["boxes"].shape == (n_boxes, 4)


@pytest.mark.parametrize(
    ("name", "image_processor_class", "patch_tokens"),
    [("tiny-clip", CLIPImageProcessorPil, 1 + 64), ("tiny-siglip", SiglipImageProcessorPil, 64)],
)
def test_load_clip_embeds_images_texts_and_patches(
    tiny_models: dict[str, Path], name: str, image_processor_class: type, patch_tokens: int
) -> None:
    model: Any
    processor: Any
    model, processor = loading.load_clip(tiny_models[name])
    assert isinstance(processor.image_processor, image_processor_class)
    texts = ["a small red square", "a blue circle on the right"]
    images = [sample_image(), Image.new("RGB", (40, 90))]
    inputs = processor(text=texts, images=images, padding="max_length", return_tensors="pt")
    with torch.inference_mode():
        image_emb = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_emb = model.get_text_features(input_ids=inputs["input_ids"]).pooler_output
        patches = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    assert image_emb.shape == text_emb.shape and image_emb.shape[0] == 2
    # 64 px / patch 8 = an 8x8 grid of patch features (CLIP adds a class token in front).
    assert patches.shape == (2, patch_tokens, 32)
    cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb)
    assert torch.all(cosine.abs() <= 1.0 + 1e-5)
