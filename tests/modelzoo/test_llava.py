"""tiny-llava, the LLaVA-1.5 / Ferret-style policy: CLIP ViT + Llama, `USER: <image>\\n... ASSISTANT:`,
boxes written `[x1, y1, x2, y2]` in 0-999 bins. Built by the factory, loaded by the production loader and
sampled by the production `PolicyRunner` (beside tiny-qwen2-vl, so the runner stays family-agnostic).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import CLIPImageProcessorPil

from services.core.boxes import Box
from services.core.formats import CoordinateFormat, Mention, parse, render
from services.modelzoo import loading, recipes
from services.modelzoo import tokenizer as tok
from services.modelzoo.recipes import sample_image
from services.policy.runner import GenerationRequest, PolicyRunner, Sampling

LLAVA = "tiny-llava"


@pytest.fixture(scope="module")
def llava(tiny_models: dict[str, Path]) -> tuple[Any, Any]:
    """(model, processor) of tiny-llava through `load_policy` (typed loosely, as transformers is)."""
    return loading.load_policy(tiny_models[LLAVA])


def _prompt(processor: Any, text: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt: str = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt


def test_build_is_fast_and_small(tmp_path: Path) -> None:
    start = time.perf_counter()
    recipes.build(LLAVA, tmp_path, seed=0, check=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"build took {elapsed:.1f}s"
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 2_000_000
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["text_config"]["model_type"] == "llama"


def test_load_policy_gives_llava_with_the_pil_clip_processor(llava: tuple[Any, Any]) -> None:
    model, processor = llava
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_chat_template_is_llava_1_5(llava: tuple[Any, Any]) -> None:
    _, processor = llava
    assert _prompt(processor, "Describe the region.") == "USER: <image>\nDescribe the region. ASSISTANT:"
    # Plain-string turns (text-only follow-ups, trainer completions) render like text parts.
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "a red car [1, 2, 3, 4]"},
        {"role": "user", "content": "And the rest?"},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "USER: <image>\nDescribe. ASSISTANT: a red car [1, 2, 3, 4] USER: And the rest? ASSISTANT:"
    )


def test_image_is_stretched_to_16_tokens_after_bos(llava: tuple[Any, Any]) -> None:
    model, processor = llava
    inputs = processor(text=[_prompt(processor, "Describe.")], images=[sample_image()], return_tensors="pt")
    # 112x84 px is stretched (not cropped) to 56x56: 4x4 patches of 14 px, CLS dropped.
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == model.config.image_seq_length == 16
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id


@pytest.mark.parametrize("do_sample", [False, True])
def test_generates_from_a_pil_image(llava: tuple[Any, Any], do_sample: bool) -> None:
    model, processor = llava
    inputs = processor(text=[_prompt(processor, "Describe.")], images=[sample_image()], return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=do_sample)
    assert prompt_length < out.shape[1] <= prompt_length + 6
    assert isinstance(processor.batch_decode(out[:, prompt_length:])[0], str)


def test_special_tokens_and_turn_markers_are_single_tokens(llava: tuple[Any, Any]) -> None:
    tokenizer = llava[1].tokenizer
    for token in (tok.LLAVA_IMAGE_TOKEN, tok.LLAVA_PAD_TOKEN, "<s>", "</s>"):
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    pieces = tokenizer.tokenize("USER: dog ASSISTANT:")
    assert pieces == ["\u2581USER", ":", "\u2581dog", "\u2581ASSISTANT", ":"]
    assert tokenizer.pad_token == tok.LLAVA_PAD_TOKEN and tokenizer.padding_side == "left"


def test_bins_are_written_digit_by_digit(llava: tuple[Any, Any]) -> None:
    tokenizer = llava[1].tokenizer
    for value in range(1000):  # every 0-999 bin: one token per digit, as Llama's split_digits gives
        assert tokenizer.tokenize(f"[{value}") == ["\u2581", "[", *str(value)]


def test_bracket_descriptions_round_trip_through_the_tokenizer(llava: tuple[Any, Any]) -> None:
    tokenizer = llava[1].tokenizer
    mentions = [Mention("small red car", Box(0, 0, 336, 336)), Mention("dog", Box(12.5, 40, 200, 301))]
    text = render(mentions, CoordinateFormat.BRACKET_999, 336, 336)
    assert text == "small red car [0, 0, 999, 999], dog [37, 119, 595, 895]."
    decoded = tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
    assert decoded == text
    boxes = parse(decoded, CoordinateFormat.BRACKET_999, 336, 336).boxes
    expected = [m.box for m in mentions if m.box is not None]
    assert len(boxes) == len(expected)
    for box, want in zip(boxes, expected, strict=True):  # within half a bin of 336 px
        assert box.as_tuple() == pytest.approx(want.as_tuple(), abs=0.2)
    for example in tok.iter_format_examples(5, seed=1):  # every format, newlines and JSON included
        assert tokenizer.decode(tokenizer.encode(example, add_special_tokens=False)) == example


@pytest.mark.parametrize("name", [LLAVA, "tiny-qwen2-vl"])
@pytest.mark.parametrize("greedy", [False, True], ids=["sampling", "greedy"])
def test_policy_runner_returns_n_samples_with_logprobs(
    tiny_models: dict[str, Path], name: str, greedy: bool
) -> None:
    runner = PolicyRunner(str(tiny_models[name]))
    sampling = Sampling(num_samples=3, max_new_tokens=5, seed=7, greedy=greedy)
    # Two prompt lengths and image sizes in one batch: left padding must line the rows up.
    requests = [
        GenerationRequest(sample_image(112, 84), "Describe.", sampling),
        GenerationRequest(sample_image(56, 56), "Describe the small red car in detail.", sampling),
    ]
    results = runner.generate(requests)
    assert len(results) == 2
    for result in results:
        assert len(result.texts) == len(result.token_logprobs) == 3
        assert all(len(lps) <= 5 for lps in result.token_logprobs)
        assert any(result.token_logprobs), "every sample ended at once"
        assert all(math.isfinite(v) and v <= 0.0 for lps in result.token_logprobs for v in lps)
        special = {runner.processor.tokenizer.pad_token, runner.processor.tokenizer.eos_token}
        assert not any(s in text for s in special for text in result.texts)
        if greedy:  # one decode per request, repeated N times
            assert len(set(result.texts)) == 1
    again = runner.generate(requests)  # the request's seed makes sampling repeatable
    assert [r.texts for r in again] == [r.texts for r in results]
