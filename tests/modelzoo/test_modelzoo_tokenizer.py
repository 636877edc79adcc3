"""The locally built tokenizers, as saved with the tiny models and loaded back by the production loaders."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from services.modelzoo import loading
from services.modelzoo import tokenizer as tok

COORDINATE_STRINGS = [
    # Qwen2.5-VL: JSON with absolute pixels, bare and fenced.
    '[{"bbox_2d": [12, 34, 567, 890], "label": "small red car"}]',
    '```json\n[\n  {"bbox_2d": [0, 5, 1279, 719], "label": "traffic light"},\n'
    '  {"bbox_2d": [3, 4, 5, 6], "label": "dog"}\n]\n```',
    # Qwen2-VL: reference and box tokens, 0-1000.
    "<|object_ref_start|>the person<|object_ref_end|><|box_start|>(100,200),(300,1000)<|box_end|>",
    "A <|object_ref_start|>blue bus<|object_ref_end|><|box_start|>(0,0),(999,999)<|box_end|> on the left.",
    # Ferret / Shikra / CogVLM: integers 0-999 or floats 0-1.
    "There is a cat [12, 340, 560, 999] next to a bench [0, 0, 1, 2].",
    "A person [0.12, 0.345, 0.5, 1.0] holding an umbrella [0.10,0.20,0.30,0.40].",
    # Off-vocabulary text and characters must survive too (byte-level BPE).
    "Zebra-like façade × 3 — 100% ÉTÉ\t日本 🚗",
]


@pytest.fixture(scope="module")
def qwen(tiny_models: dict[str, Path]) -> Any:
    return loading.load_policy_processor(tiny_models["tiny-qwen2.5-vl"]).tokenizer


@pytest.mark.parametrize("text", COORDINATE_STRINGS)
def test_qwen_tokenizer_round_trips_coordinate_formats(qwen: Any, text: str) -> None:
    ids = qwen.encode(text)
    assert qwen.decode(ids) == text


def test_qwen_tokenizer_round_trips_generated_formats(qwen: Any) -> None:
    for text in tok.iter_format_examples(200, seed=7):
        assert qwen.decode(qwen.encode(text)) == text


def test_qwen_control_tokens_are_single_special_ids(qwen: Any) -> None:
    for token in tok.QWEN_SPECIAL_TOKENS:
        ids = qwen.encode(token)
        assert len(ids) == 1 and qwen.convert_ids_to_tokens(ids[0]) == token
    assert qwen.eos_token == "<|im_end|>" and qwen.pad_token == "<|endoftext|>"
    # As in the released tokenizers, box tokens are special: parsers must decode with them kept.
    text = "<|box_start|>(1,2),(3,4)<|box_end|>"
    assert qwen.decode(qwen.encode(text), skip_special_tokens=True) == "(1,2),(3,4)"


def test_qwen_vocabulary_words_are_single_tokens(qwen: Any) -> None:
    for word in ("red", "car", "left", "above", "person", "bicycle", "label", "circle", "giraffe"):
        assert qwen.tokenize(" " + word) == ["Ġ" + word], word
    # Digits are split one by one (Qwen's pre-tokeniser), so every number is representable.
    assert qwen.tokenize("1234") == ["1", "2", "3", "4"]


def test_bert_tokenizer_covers_grounding_prompts(tiny_models: dict[str, Path]) -> None:
    tokenizer = loading.load_processor(tiny_models["tiny-grounding-dino"]).tokenizer
    tokens = tokenizer.tokenize("A red car. A traffic light. Xylophone_9.")
    assert tokens[:8] == ["a", "red", "car", ".", "a", "traffic", "light", "."]
    assert "[UNK]" not in tokens  # unknown words fall back to characters and ## pieces


def test_clip_tokenizers_lower_case_whole_words(tiny_models: dict[str, Path]) -> None:
    for name, max_length in (("tiny-clip", 77), ("tiny-owlv2", 16)):
        tokenizer = loading.load_processor(tiny_models[name]).tokenizer
        assert tokenizer.tokenize("A photo of the Red car") == [
            "a</w>",
            "photo</w>",
            "of</w>",
            "the</w>",
            "red</w>",
            "car</w>",
        ]
        assert tokenizer.model_max_length == max_length


def test_siglip_tokenizer_ends_with_eos(tiny_models: dict[str, Path]) -> None:
    tokenizer = loading.load_processor(tiny_models["tiny-siglip"]).tokenizer
    ids = tokenizer("a red car")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids


def test_learn_merges_breaks_ties_by_pair() -> None:
    counts: Counter[tuple[str, ...]] = Counter({("x", "y"): 2, ("a", "b"): 2, ("a", "b", "c"): 1})
    # Most frequent pair first: a+b (3), then x+y (2), then ab+c (1).
    assert tok.learn_merges(counts, max_merges=10, min_frequency=1) == [("a", "b"), ("x", "y"), ("ab", "c")]
    tie: Counter[tuple[str, ...]] = Counter(
        {("q", "r"): 2, ("b", "c"): 2}
    )  # equal counts: the smaller pair first
    assert tok.learn_merges(tie, max_merges=10) == [("b", "c"), ("q", "r")]
    assert tok.learn_merges(counts, max_merges=10, min_frequency=3) == [("a", "b")]


def test_bpe_vocabulary_is_deterministic() -> None:
    first = json.loads(tok.build_qwen_tokenizer().backend_tokenizer.to_str())["model"]
    second = json.loads(tok.build_qwen_tokenizer().backend_tokenizer.to_str())["model"]
    assert first == second
