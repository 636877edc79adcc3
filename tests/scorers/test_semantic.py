"""Semantic scorer: CLIPScore mapping, sentences, region pooling, and the real MiniLM reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.scorers.common import load_region, split_sentences
from services.scorers.semantic.logic import SemanticScorer, clip_score, reference_text
from services.scorers.semantic.settings import SemanticBackend, SemanticSettings
from spr.v1 import describer_pb2
from tests.scorers.conftest import candidates, make_region, scene_png


@pytest.fixture(scope="module")
def minilm() -> SemanticScorer:
    return SemanticScorer(SemanticSettings(backend=SemanticBackend.MINILM))


def test_clip_score_mapping() -> None:
    np.testing.assert_allclose(
        clip_score(np.array([-0.3, 0.0, 0.2, 0.39, 0.5]), 2.5), [0, 0, 0.5, 0.975, 1.0]
    )


def test_sentences() -> None:
    assert split_sentences("A red circle. A blue square!\nDone") == [
        "A red circle.",
        "A blue square!",
        "Done",
    ]
    assert split_sentences("box [0.1, 0.2, 0.3, 0.4] here.") == ["box [0.1, 0.2, 0.3, 0.4] here."]
    assert split_sentences("   ") == ["."]


def test_minilm_ranks_a_matching_description_above_an_unrelated_one(minilm: SemanticScorer) -> None:
    region = make_region()
    assert reference_text(region) == "red circle, blue square"
    texts = [
        "There is a red circle and a blue square.",
        "A man is cooking pasta in a kitchen. He wears an apron.",
    ]
    cands = [describer_pb2.Candidate(candidate_id=str(i), text=t) for i, t in enumerate(texts)]
    matching, unrelated = minilm.score_reference(region, cands)
    assert matching.s_sem > unrelated.s_sem + 0.2
    assert unrelated.sentence_count == 2
    assert minilm.scorer_id.startswith("minilm-reference:all-MiniLM-L6-v2@")


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_dual_encoder_scores_are_components_of_s_sem(name: str, tiny_models: dict[str, Path]) -> None:
    s = SemanticScorer(SemanticSettings(model=str(tiny_models[name])))
    region = load_region(make_region(), scene_png(), s.settings.images)
    got = s.score(region, candidates(4))
    for score in got:
        assert 0.0 <= score.crop_score <= 1.0 and 0.0 <= score.local_score <= 1.0
        assert score.s_sem == pytest.approx((score.crop_score + score.local_score) / 2)
        assert score.sentence_count == 2
    unbatched = SemanticScorer(SemanticSettings(model=str(tiny_models[name]), batch_texts=False), s.encoder)
    for a, b in zip(got, unbatched.score(region, candidates(4)), strict=True):
        assert a.s_sem == pytest.approx(b.s_sem, abs=1e-5)


def test_patch_mask_covers_the_region(tiny_models: dict[str, Path]) -> None:
    s = SemanticScorer(SemanticSettings(model=str(tiny_models["tiny-clip"])))
    encoder = s.encoder
    assert not isinstance(encoder, type(None))
    grid = encoder.grid  # type: ignore[union-attr]
    mask = encoder.patch_mask((200, 100), (0, 0, 100, 50)).reshape(grid, grid)  # type: ignore[union-attr]
    assert mask[: grid // 2, : grid // 2].all() and not mask[grid // 2 :, :].any()
    tiny = encoder.patch_mask((200, 100), (0, 0, 1, 1))  # type: ignore[union-attr]
    assert tiny.sum() == 1  # a region smaller than a patch still pools its nearest patch
