"""The bootstrap's plumbing on a tiny world and a few steps: world -> SFT -> saved policy that the
production loader and `PolicyRunner` serve -> REC evaluation; caching and reproducibility; the encoding
matching what serving sends; the coordinate soft labels."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from services.bootstrap.clip import ClipRecipe, all_phrases, object_crops
from services.bootstrap.data import Example
from services.bootstrap.pipeline import (
    FORMAT,
    Bootstrapped,
    bootstrap,
    bootstrap_clip,
    fingerprint,
    main,
    parse_args,
    recipe_from_args,
    training_data,
    training_split,
    world_files,
)
from services.bootstrap.recipe import BINS, PolicyRecipe, build_model, build_processor
from services.bootstrap.train import IGNORE, CoordinateSmoothing, batch_loss, encode, length_sorted_parts
from services.core.boxes import Box
from services.core.formats import parse
from services.evaluation.cli import evaluate
from services.evaluation.datasets import read_spr_rec
from services.evaluation.rec import best_iou
from services.modelzoo.loading import load_policy
from services.policy.runner import PolicyRunner, chat_prompt
from services.scorers.semantic.backends import load_torch_encoder
from services.world.build import SPLITS, WorldFiles

SMOKE = PolicyRecipe(
    steps=3,
    batch_size=8,
    warmup_steps=1,
    world_images=24,
    test_fraction=0.25,
    vision_pretrain_steps=2,
    vision_pretrain_batch_size=8,
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Bootstrapped:
    return bootstrap(SMOKE, tmp_path_factory.mktemp("cache"))


def test_smoke_bootstrap_serves_and_evaluates(smoke: Bootstrapped) -> None:
    assert not smoke.from_cache and smoke.policy.is_dir()
    assert smoke.manifest["recipe"]["steps"] == 3 and len(smoke.manifest["losses"]) == 1
    model, _ = load_policy(smoke.policy)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    samples = read_spr_rec(smoke.rec_test)[:4]
    (result,) = evaluate(PolicyRunner(str(smoke.policy)), samples, batch_size=4, max_new_tokens=6)
    assert len(result.predictions) == 4


def test_second_call_is_a_cache_hit(smoke: Bootstrapped) -> None:
    start = time.perf_counter()
    again = bootstrap(SMOKE, smoke.folder.parent)
    assert again.from_cache and again.folder == smoke.folder
    assert time.perf_counter() - start < 1.0


def test_training_is_reproducible_by_seed(smoke: Bootstrapped, tmp_path: Path) -> None:
    again = bootstrap(SMOKE, tmp_path)
    weights = (smoke.policy / "model.safetensors").read_bytes()
    assert (again.policy / "model.safetensors").read_bytes() == weights
    other_seed = bootstrap(replace(SMOKE, seed=1), tmp_path)
    assert (other_seed.policy / "model.safetensors").read_bytes() != weights


def test_sft_answers_carry_the_recipes_loose_boxes(smoke: Bootstrapped) -> None:
    split = training_split(world_files(smoke))
    processor = build_processor(SMOKE)
    assert SMOKE.box_label_slack == 0  # the default recipe's: exact boxes
    recipes = (replace(SMOKE, box_label_slack=0.15), SMOKE)
    loose, exact = (training_data(split, processor, r) for r in recipes)
    for task, (loose_examples, exact_examples) in enumerate(zip(loose, exact, strict=True)):
        loose_boxes = _answer_boxes([e.example for e in loose_examples])
        exact_boxes = _answer_boxes([e.example for e in exact_examples])
        assert len(loose_boxes) == len(exact_boxes) > len(split.images)  # the same answers, boxes alone moved
        pairs = list(zip(loose_boxes, exact_boxes, strict=True))
        assert all(lo.contains(ex.pad(-0.05)) for lo, ex in pairs)  # out on every side (rounding aside)
        ious = [best_iou(lo, [ex]) for lo, ex in pairs]
        assert min(ious) > 0.45, task  # 1 / 1.3**2 = 0.59 where the image does not clip
        assert sum(ious) / len(ious) < 0.7, task


def test_rec_answers_can_name_the_target_as_a_description_mention_does(smoke: Bootstrapped) -> None:
    split = training_split(world_files(smoke))
    processor = build_processor(SMOKE)
    assert not SMOKE.rec_answer_names_object  # the default recipe's: the box alone
    (plain, _), (named, _) = (
        training_data(split, processor, r) for r in (SMOKE, replace(SMOKE, rec_answer_names_object=True))
    )
    plains, nameds = [e.example for e in plain], [e.example for e in named]
    assert _answer_boxes(nameds) == _answer_boxes(plains)  # the same box, read back
    for sample, plain_example, named_example in zip(split.samples, plains, nameds, strict=True):
        phrase, box = named_example.answer.rsplit(" [", 1)
        assert plain_example.answer == "[" + box and named_example.instruction == plain_example.instruction
        (mention,) = parse(named_example.answer, FORMAT, 96, 96).mentions
        assert mention.phrase == phrase and phrase.split()[-1] in sample.expression  # its shape


def _answer_boxes(examples: list[Example]) -> list[Box]:
    """Every box of the examples' answers, in their frames, in order."""
    return [
        box
        for example in examples
        for box in parse(example.answer, FORMAT, example.image.width, example.image.height).boxes
    ]


def test_fingerprint_covers_steps_and_world() -> None:
    prints = {fingerprint(r) for r in (SMOKE, replace(SMOKE, steps=4), replace(SMOKE, world_seed=1))}
    assert len(prints) == 3 and fingerprint(SMOKE) == fingerprint(replace(SMOKE))


def test_cli_defaults_are_the_recipe_the_main_job_looks_up() -> None:
    # `spr-bootstrap` run first to warm the cache must fill the entry `spr-main` (PolicyRecipe()) reads.
    assert recipe_from_args(parse_args([])) == PolicyRecipe()
    short = recipe_from_args(parse_args(["--steps", "40"]))
    assert short.steps == 40 and short.warmup_steps == 4


def test_cli_trains_then_hits_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--cache", str(tmp_path), "--steps", "2", "--images", "16", "--batch-size", "4"]
    args += ["--vision-steps", "2", "--clip", "--clip-steps", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trained in" in printed and "\ttrained; held-out top-1 retrieval" in printed
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "\tcached in" in printed and "\tcached; held-out" in printed


def test_encoding_matches_what_the_processor_sends() -> None:
    recipe = PolicyRecipe()
    processor = build_processor(recipe)
    image = Image.new("RGB", (96, 96), (120, 130, 140))
    example = Example("rec", image, "Where is the red circle?", "[10, 20, 300, 400]")
    encoded = encode(processor, recipe.image_tokens, example)
    served = processor(
        text=[chat_prompt(processor, example.instruction)], images=[image], return_tensors="pt"
    )
    prompt = served["input_ids"][0].tolist()
    assert encoded.input_ids[: len(prompt)] == prompt
    answer = [t for t in encoded.labels if t != IGNORE]
    assert (
        processor.tokenizer.decode(answer[:-1]) == example.answer
        and answer[-1] == processor.tokenizer.eos_token_id
    )
    assert len(answer) == 1 + 13  # "▁", "[", four numbers of one token each, three ",▁", "]", and </s>


def test_coordinate_soft_labels() -> None:
    processor = build_processor(PolicyRecipe())
    tokenizer = processor.tokenizer
    smoothing = CoordinateSmoothing.for_tokenizer(tokenizer, BINS, sigma=15.0)
    labels = torch.tensor(tokenizer.convert_tokens_to_ids(["500", "0", "]"]))
    log_probs = torch.log_softmax(
        torch.randn(3, len(tokenizer), generator=torch.Generator().manual_seed(0)), -1
    )
    # the definition: a Gaussian of sigma 15 bins over the number tokens, normalised; one-hot otherwise
    numbers = torch.tensor(tokenizer.convert_tokens_to_ids([str(v) for v in range(BINS)]))
    expected = []
    for row, value in enumerate((500, 0, None)):
        if value is None:
            expected.append(-log_probs[row, labels[row]])
            continue
        weights = torch.exp(-((torch.arange(BINS) - value) ** 2) / (2 * 15.0**2))
        expected.append(-(weights / weights.sum() * log_probs[row, numbers]).sum())
    assert torch.allclose(smoothing.nll(log_probs, labels), torch.stack(expected), atol=1e-5)
    near, far = (smoothing.table[500, 515], smoothing.table[500, 560])
    assert float(near) == pytest.approx(float(smoothing.table[500, 500]) * 0.6065307, rel=1e-4)
    assert far < 1e-3 * smoothing.table[500, 500]
    assert torch.equal(smoothing.nll(log_probs[2:], labels[2:]), -log_probs[2:, labels[2]])  # no number row


def test_a_batch_in_length_sorted_parts_has_the_loss_and_gradients_of_one_batch(smoke: Bootstrapped) -> None:
    processor = build_processor(SMOKE)
    rec, describe = training_data(training_split(world_files(smoke)), processor, SMOKE)
    examples = random.Random(0).sample(describe, 6) + random.Random(0).sample(rec, 3)
    parts = length_sorted_parts(examples, 3)
    assert [len(p) for p in parts] == [3, 3, 3]
    assert sorted((e for p in parts for e in p), key=id) == sorted(examples, key=id)
    assert max(len(e.input_ids) for e in parts[0]) <= min(len(e.input_ids) for e in parts[1])
    model = build_model(SMOKE, processor)
    smoothing = CoordinateSmoothing.for_tokenizer(processor.tokenizer, BINS, SMOKE.coordinate_sigma_bins)
    losses, grads = [], []
    for count in (1, 3):
        model.zero_grad()
        loss = batch_loss(model, processor, examples, smoothing, "cpu", parts=count)
        loss.backward()  # type: ignore[no-untyped-call]
        losses.append(float(loss.detach()))
        grads.append(model.lm_head.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_position_embeddings_start_at_the_content_scale() -> None:
    recipe = PolicyRecipe()
    model = build_model(recipe, build_processor(recipe))
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    assert float(weight[1:].detach().std()) == pytest.approx(recipe.position_init_std, rel=1e-3)
    assert float(weight[0].detach().abs().sum()) == 0.0


def test_number_embeddings_start_smooth_in_their_value() -> None:
    recipe = replace(PolicyRecipe(), number_init=True)
    processor = build_processor(recipe)
    model = build_model(recipe, processor)
    ids = processor.tokenizer.convert_tokens_to_ids(["500", "501", "510", "900"])
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        rows = weight[ids].detach()
        near, mid, far = (float(torch.cosine_similarity(rows[0], rows[i], dim=0)) for i in (1, 2, 3))
        assert near > 0.9 and near > mid > far  # nearby numbers start alike, distant ones apart
        assert float(rows.std()) == pytest.approx(0.02, rel=0.3)  # on the scale of the other tokens


def test_clip_for_the_semantic_scorer_trains_caches_and_loads(smoke: Bootstrapped, tmp_path: Path) -> None:
    world = WorldFiles(smoke.world / "annotations.json", {s: smoke.world / f"rec_{s}.json" for s in SPLITS})
    recipe = ClipRecipe(steps=3, batch_size=8)
    folder, hit, manifest = bootstrap_clip(recipe, world, tmp_path)
    assert not hit and 0.0 <= manifest["retrieval_top1"] <= 1.0
    encoder = load_torch_encoder(folder, "cpu")  # what the semantic scorer runs
    assert encoder.encode_texts(["striped red circle"]).shape[0] == 1
    assert bootstrap_clip(recipe, world, tmp_path)[1]  # second call: cache hit
    crops = object_crops(world, "test", recipe.pad)
    assert crops and all(c.phrase in all_phrases() for c in crops)
