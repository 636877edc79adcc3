"""Pairs -> TRL dataset -> Parquet -> back into TRL's DPOTrainer; the recipe end to end on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from services.core.formats import MEDIA_PLACEHOLDERS
from services.describer.families import get_family
from services.modelzoo.loading import load_policy, load_policy_processor
from services.modelzoo.tiny import ensure_model
from services.policy.runner import chat_prompt
from tests.trainer.conftest import make_pairs, small_config
from tests.trainer.interop import assert_llama_factory_reads, assert_vllm_loads
from trainer.dataset import (
    build_dataset,
    dataset_sha256,
    export_parquet,
    load_parquet,
    policy_frame,
    split_heldout,
)
from trainer.recipe import (
    ServingPrefixCollator,
    closed_answers,
    make_trainer,
    serving_prefix_ids,
    train_round,
)

FAMILY = get_family("qwen2.5-vl")


def test_frame_is_the_crop_or_the_full_image(tmp_path: Path) -> None:
    crop_pair, full_pair = make_pairs(tmp_path, 2)[1], make_pairs(tmp_path, 2)[0]
    crop = policy_frame(crop_pair, FAMILY)
    full = policy_frame(full_pair, FAMILY)
    # crop bounds: floor/ceil of (4.5, 2, 40, 30.2) -> 36x29, resized to the family's frame (28-multiples)
    assert crop.size == FAMILY.frame_size(36, 29)
    assert full.size == FAMILY.frame_size(64, 48)


def test_prompt_renders_exactly_as_serving(tmp_path: Path, tiny_policy: Path) -> None:
    processor = load_policy_processor(tiny_policy)
    pair = make_pairs(tmp_path, 1)[0]
    row = build_dataset([pair], FAMILY)[0]
    messages = [{"role": m["role"], "content": [b for b in m["content"]]} for m in row["prompt"]]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == chat_prompt(processor, pair.prompt)


def test_parquet_round_trip_keeps_rows_and_hash(tmp_path: Path) -> None:
    dataset = build_dataset(make_pairs(tmp_path / "img", 4), FAMILY)
    loaded = load_parquet(export_parquet(dataset, tmp_path / "pairs.parquet"))
    assert loaded.column_names[: len(dataset.column_names)] == dataset.column_names  # + LLaMA-Factory's
    assert loaded["pair_id"] == dataset["pair_id"]
    assert isinstance(loaded[0]["images"][0], Image.Image)
    assert dataset_sha256(loaded) == dataset_sha256(dataset)


def test_parquet_export_reads_in_llama_factory_as_a_preference_dataset(tmp_path: Path) -> None:
    pairs = make_pairs(tmp_path / "img", 3)
    dataset = build_dataset(pairs, FAMILY)
    export_parquet(dataset, tmp_path / "out" / "round-1.parquet")
    export_parquet(build_dataset(pairs[:1], FAMILY), tmp_path / "out" / "round-2.parquet")

    rows = assert_llama_factory_reads(tmp_path / "out", "round-1")
    assert len(assert_llama_factory_reads(tmp_path / "out", "round-2")) == 1  # both entries registered
    assert len(rows) == 3
    for row, pair, trl_row in zip(rows, pairs, dataset, strict=True):
        # The image comes first, as in TRL's prompt turn (and serving's chat_prompt).
        assert row["_prompt"] == [{"role": "user", "content": "<image>" + pair.prompt}]
        assert row["_response"] == [
            {"role": "assistant", "content": pair.chosen.text},
            {"role": "assistant", "content": pair.rejected.text},
        ]
        (image,), (trl_image,) = row["_images"], trl_row["images"]
        assert image.size == trl_image.size and image.tobytes() == trl_image.convert(image.mode).tobytes()


def test_heldout_split_is_stable_and_never_empty(tmp_path: Path) -> None:
    dataset = build_dataset(make_pairs(tmp_path, 4), FAMILY)
    train, held = split_heldout(dataset, 0.25)
    assert len(train) >= 1 and len(held) >= 1 and len(train) + len(held) == 4
    again_train, _ = split_heldout(dataset, 0.25)
    assert again_train["pair_id"] == train["pair_id"]
    assert len(split_heldout(dataset, 0.0)[1]) == 0


def test_parquet_export_trains_with_dpo_trainer(tmp_path: Path, tiny_policy: Path) -> None:
    """The Parquet file, loaded as any TRL user would (LLaMA-Factory's extra columns included), trains
    through the recipe and yields a PEFT folder that vLLM's LoRA loader accepts."""
    path = export_parquet(build_dataset(make_pairs(tmp_path / "img", 6), FAMILY), tmp_path / "p.parquet")
    train, held = split_heldout(load_parquet(path), 0.3)
    cfg = small_config(tiny_policy, tmp_path)
    result = train_round(cfg, train, held, None, tmp_path / "round")
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    for key in ("train_loss", "train_reward_margin", "eval_preference_accuracy", "eval_reward_margin"):
        assert key in result.metrics
    assert_vllm_loads(result.adapter_dir, json.loads((tiny_policy / "config.json").read_text()))


def test_sft_chosen_objective_trains_the_chosen_nll_without_the_preference_term(
    tmp_path: Path, tiny_policy: Path
) -> None:
    """The SFT-on-chosen control: on the same first batch, with the fresh LoRA still equal to the
    reference, DPO's sigmoid term is exactly ln 2, so DPO (+ NLL) minus SFT-on-chosen (NLL) is ln 2."""
    path = export_parquet(build_dataset(make_pairs(tmp_path / "img", 6), FAMILY), tmp_path / "p.parquet")
    train, held = split_heldout(load_parquet(path), 0.3)
    losses = {}
    for objective in ("dpo", "sft-chosen"):
        cfg = small_config(tiny_policy, tmp_path / objective, objective=objective, max_steps=1, rpo_alpha=1.0)
        losses[objective] = train_round(cfg, train, held, None, tmp_path / objective / "round").metrics[
            "train_loss"
        ]
    assert losses["sft-chosen"] > 0
    assert losses["dpo"] - losses["sft-chosen"] == pytest.approx(math.log(2), abs=1e-3)
    with pytest.raises(ValueError, match="objective"):
        small_config(tiny_policy, tmp_path, objective="ppo")


def test_answers_with_media_placeholders_train_instead_of_failing_the_round(
    tmp_path: Path, tiny_policy: Path
) -> None:
    """A garbage answer that spells the processor's image placeholder (seen from a barely trained LLaVA
    policy in the main job) used to fail TRL's collator ("Found 2 <image> tokens ... but no images"),
    and a failed round never advances its offsets: the placeholders are dropped from the answers."""
    pairs = make_pairs(tmp_path / "img", 4)
    for pair in pairs:
        pair.chosen.text += " <image><|image_pad|> <|vision_start|>x<|vision_end|>"
        pair.rejected.text = "<image> <video><|video_pad|>"
    dataset = build_dataset(pairs, FAMILY)
    for row in dataset:
        for turn in (*row["chosen"], *row["rejected"]):
            text = turn["content"][-1]["text"]
            assert not any(p in text for p in MEDIA_PLACEHOLDERS), text
    cfg = small_config(tiny_policy, tmp_path)
    result = train_round(cfg, dataset, dataset.select([]), None, tmp_path / "r")
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("policy", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_every_trained_answer_ends_in_exactly_one_eos(tmp_path: Path, policy: str) -> None:
    """TRL adds no EOS to conversational rows; LLaVA's template ends an assistant turn with a space, so
    DPO taught the world policy to run on past its REC box. Rendered by `closed_answers`, every answer
    TRL trains on ends with the tokenizer's EOS once (Qwen's template already closes with it)."""
    model_dir = ensure_model(policy)
    model, processor = load_policy(str(model_dir), "cpu", "float32")
    family = get_family("ferret" if policy == "tiny-llava" else "qwen2.5-vl")
    dataset = build_dataset(make_pairs(tmp_path / "img", 4), family)
    tokenizer = processor.tokenizer
    for row in closed_answers(dataset, processor):
        for answer in (row["chosen"], row["rejected"]):
            assert answer.endswith(tokenizer.eos_token) and answer.count(tokenizer.eos_token) == 1, answer
    cfg = small_config(model_dir, tmp_path, model_family=family.name)
    batch = next(iter(make_trainer(cfg, model, processor, dataset, tmp_path / "t").get_train_dataloader()))
    for ids, mask in zip(batch["input_ids"], batch["completion_mask"], strict=True):
        last = int(mask.nonzero().max())  # the last trained token of each chosen / rejected row
        assert int(ids[last]) == tokenizer.eos_token_id


@pytest.mark.parametrize("policy", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_every_trained_prompt_is_the_token_sequence_serving_sends(tmp_path: Path, policy: str) -> None:
    """TRL tokenizes prompts without special tokens, trusting the chat template to write the BOS;
    LLaVA-1.5's does not (serving's processor call adds it), so rounds trained the world policy on
    sequences that lacked the first token of every sequence it was trained and served on. Each trained
    prompt, chosen and rejected rows alike, must be exactly serving's ids for the same turn and image."""
    model_dir = ensure_model(policy)
    model, processor = load_policy(str(model_dir), "cpu", "float32")
    family = get_family("ferret" if policy == "tiny-llava" else "qwen2.5-vl")
    pairs = make_pairs(tmp_path / "img", 3)
    dataset = build_dataset(pairs, family)
    cfg = small_config(model_dir, tmp_path, model_family=family.name)
    trainer = make_trainer(cfg, model, processor, dataset, tmp_path / "t")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    served = [
        processor(text=[chat_prompt(processor, pair.prompt)], images=row["images"], return_tensors="pt")[
            "input_ids"
        ][0].tolist()
        for pair, row in zip(pairs, dataset, strict=True)
    ]
    rows = zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], strict=True)
    for index, (ids, mask, completion) in enumerate(rows):
        prompt = ids[mask.bool() & ~completion.bool()].tolist()
        assert prompt == served[index % len(pairs)], processor.tokenizer.convert_ids_to_tokens(prompt[:4])
    # max_length still bounds the rows with the prefix in front
    prefix = serving_prefix_ids(processor.tokenizer)
    collate = ServingPrefixCollator(processor, max_length=len(served[0]) + 2, prefix_ids=prefix)
    short = collate([trainer.train_dataset[i] for i in range(len(pairs))])
    assert short["input_ids"].shape[1] == short["completion_mask"].shape[1] == len(served[0]) + 2
    assert short["input_ids"][0, : len(served[0])].tolist() == served[0]
