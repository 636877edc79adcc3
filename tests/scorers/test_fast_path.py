"""The scorers' own preprocessing equals the transformers code it replaces; caches; int8 graphs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image
from transformers.models.grounding_dino import modeling_grounding_dino as gdino

from services.modelzoo.loading import load_processor
from services.scorers.common import load_region
from services.scorers.localization.backends import DinoGrounder, OwlGrounder, dino_text_masks
from services.scorers.localization.logic import LocalizationScorer
from services.scorers.localization.settings import GroundingBackend, LocalizationSettings
from services.scorers.onnx_export import Parity, main
from services.scorers.onnx_runtime import graph_paths
from services.scorers.preprocess import PixelPreprocessor
from services.scorers.sample import scene_image
from services.scorers.semantic.backends import DualEncoder, EmbeddingCache, pads_to_longest
from services.scorers.semantic.logic import SemanticScorer
from services.scorers.semantic.settings import SemanticBackend, SemanticSettings
from tests.scorers.conftest import ENCODER_MODELS, GROUNDING_MODELS, candidates, make_region, scene_png

SIZES = {"tiny-grounding-dino": 128, "tiny-owlv2": 96, "tiny-clip": 64, "tiny-siglip": 64}


def images() -> list[Image.Image]:
    """A crop smaller than the model input, the full scene, a tall strip, a grey image, noise."""
    scene = scene_image()
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 220, 3), dtype=np.uint8))
    return [scene.crop((10, 10, 180, 130)), scene, scene.crop((0, 0, 30, 100)), scene.convert("L"), noise]


@pytest.mark.parametrize("name", [*GROUNDING_MODELS, *ENCODER_MODELS])
def test_pixel_preprocessing_equals_the_transformers_processor(
    name: str, tiny_models: dict[str, Path]
) -> None:
    processor = load_processor(tiny_models[name]).image_processor
    ours = PixelPreprocessor.of(processor)
    size = SIZES[name]
    for image in images():
        theirs = processor(
            images=image.convert("RGB"),
            size={"height": size, "width": size},
            do_center_crop=False,
            return_tensors="np",
        )["pixel_values"]
        np.testing.assert_allclose(ours([image], size), np.asarray(theirs), atol=1e-6, rtol=0)


def test_dino_text_masks_equal_the_transformers_function() -> None:
    rng = np.random.default_rng(0)
    special = [101, 102, 1012, 1029]
    for _ in range(20):
        ids = rng.choice([101, 102, 1012, 1029, 5, 6, 7, 8, 0], size=(2, 40)).astype(np.int64)
        mask, positions = dino_text_masks(ids, special)
        reference: Any = gdino.generate_masks_with_special_tokens_and_transfer_map
        ref_mask, ref_positions = reference(torch.from_numpy(ids), torch.tensor(special))
        np.testing.assert_array_equal(mask, ref_mask.numpy())
        np.testing.assert_array_equal(positions, ref_positions.numpy())


def test_owlv2_queries_tokenize_like_the_batched_tokenizer(tiny_models: dict[str, Path]) -> None:
    scorer = LocalizationScorer(LocalizationSettings(model=str(tiny_models["tiny-owlv2"])))
    grounder = scorer.grounder
    assert isinstance(grounder, OwlGrounder)
    queries = ["red circle", "a very long phrase " * 5, "blue square"]
    theirs = grounder.tokenizer(
        queries + [""] * (grounder.max_queries - len(queries)),
        padding="max_length",
        truncation=True,
        max_length=grounder.text_length,
        return_tensors="np",
    )
    ours = grounder.text_inputs(queries)
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])


def test_embedding_cache_embeds_each_text_once_and_evicts_the_oldest() -> None:
    calls: list[list[str]] = []

    def encode(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        calls.append(list(texts))
        return np.asarray([[float(len(t)), 1.0] for t in texts], dtype=np.float32)

    cache = EmbeddingCache(2)
    got = cache.embed(["ab", "abc", "ab"], encode)
    np.testing.assert_array_equal(got[:, 0], [2, 3, 2])
    assert calls == [["ab", "abc"]]  # duplicates in one call are embedded once
    cache.embed(["abc", "x"], encode)
    assert calls[-1] == ["x"]  # "abc" was cached; "ab" is now the oldest and gets evicted
    cache.embed(["ab"], encode)
    assert calls[-1] == ["ab"]
    EmbeddingCache(0).embed(["a", "a"], encode)
    assert calls[-1] == ["a"]


@pytest.mark.parametrize("name", ENCODER_MODELS)
def test_cached_text_embeddings_score_exactly_like_fresh_ones(
    name: str, tiny_models: dict[str, Path]
) -> None:
    region = load_region(make_region(), scene_png(), SemanticSettings().images)
    fresh = SemanticScorer(SemanticSettings(model=str(tiny_models[name]), text_cache_size=0))
    cached = SemanticScorer(SemanticSettings(model=str(tiny_models[name])))
    assert isinstance(cached.encoder, DualEncoder)
    first = cached.score(region, candidates())
    second = cached.score(region, candidates())  # every sentence from the cache now
    assert first == second == fresh.score(region, candidates())


def test_int8_export_writes_quantized_graphs_that_score_close_to_pytorch(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """int8 rounds weights to 8 bits, so scores agree within 0.05 (not 1e-4 as fp32 does)."""
    folder = tmp_path / "clip"
    assert main([str(tiny_models["tiny-clip"]), str(folder), "--int8"]) == 0
    assert "parity vision.int8[0]: max abs diff" in capsys.readouterr().out
    assert set(graph_paths(folder, int8=True)) == {"vision", "text"}
    region = load_region(make_region(), scene_png(), SemanticSettings().images)
    reference = SemanticScorer(SemanticSettings(model=str(tiny_models["tiny-clip"])))
    int8 = SemanticScorer(SemanticSettings(model=str(folder), backend=SemanticBackend.ONNX, onnx_int8=True))
    assert int8.scorer_id.startswith("clip-onnx-int8:")
    for e, g in zip(reference.score(region, candidates()), int8.score(region, candidates()), strict=True):
        assert g.s_sem == pytest.approx(e.s_sem, abs=0.05)


def test_a_folder_without_int8_graphs_says_how_to_make_them(
    onnx_exports: dict[str, tuple[Path, list[Parity]]],
) -> None:
    with pytest.raises(FileNotFoundError, match="--int8"):
        graph_paths(onnx_exports["tiny-clip"][0], int8=True)


def test_clip_texts_padded_to_the_longest_embed_exactly_as_padded_to_77(tiny_models: dict[str, Path]) -> None:
    scorer = SemanticScorer(SemanticSettings(model=str(tiny_models["tiny-clip"]), text_cache_size=0))
    encoder = scorer.encoder
    assert isinstance(encoder, DualEncoder) and encoder.pad_to_longest
    texts = ["one", "a second, longer sentence with a few more words", "third."]
    short = encoder.text_feed(texts)
    assert short["input_ids"].shape[1] < encoder.text_length
    encoder.pad_to_longest = False
    full = encoder.text_feed(texts)
    assert full["input_ids"].shape[1] == encoder.text_length
    np.testing.assert_allclose(encoder.text(short)[0], encoder.text(full)[0], atol=1e-6)
    assert not pads_to_longest("siglip")  # SigLIP pools the last position: it needs the full length


def test_the_clip_export_has_a_dynamic_sequence_axis(
    onnx_exports: dict[str, tuple[Path, list[Parity]]],
) -> None:
    clip = SemanticScorer(
        SemanticSettings(model=str(onnx_exports["tiny-clip"][0]), backend=SemanticBackend.ONNX)
    )
    siglip = SemanticScorer(
        SemanticSettings(model=str(onnx_exports["tiny-siglip"][0]), backend=SemanticBackend.ONNX)
    )
    assert isinstance(clip.encoder, DualEncoder) and isinstance(siglip.encoder, DualEncoder)
    assert clip.encoder.pad_to_longest and not siglip.encoder.pad_to_longest
    assert clip.encoder.encode_texts(["a", "a much longer text than the first one"]).shape[0] == 2


def test_dino_queries_padded_to_a_multiple_of_16_ground_exactly_as_padded_to_256(
    tiny_models: dict[str, Path],
) -> None:
    region = load_region(make_region(), scene_png(), LocalizationSettings().images)
    settings = LocalizationSettings(model=str(tiny_models["tiny-grounding-dino"]), box_threshold=0.2)
    short, full = LocalizationScorer(settings), LocalizationScorer(settings)
    assert isinstance(short.grounder, DinoGrounder) and isinstance(full.grounder, DinoGrounder)
    full.grounder.pad_to_longest = False
    feed, _ = short.grounder._text_inputs(["red circle", "blue square"])
    assert feed["input_ids"].shape == (1, 16) and feed["text_self_attention_masks"].shape == (1, 16, 16)
    assert full.grounder._text_inputs(["red circle"])[0]["input_ids"].shape == (1, full.grounder.text_length)
    assert short.grounder.text_width(17) == 32 and short.grounder.text_width(10_000) == 256
    assert short.score(region, candidates()) == full.score(region, candidates())


def test_the_dino_export_has_a_dynamic_text_axis_checked_at_two_widths(
    onnx_exports: dict[str, tuple[Path, list[Parity]]],
) -> None:
    folder, report = onnx_exports["tiny-grounding-dino"]
    assert len([p for p in report if p.graph == "model"]) == 4  # two outputs at two text widths
    scorer = LocalizationScorer(LocalizationSettings(model=str(folder), backend=GroundingBackend.ONNX))
    assert isinstance(scorer.grounder, DinoGrounder) and scorer.grounder.pad_to_longest
