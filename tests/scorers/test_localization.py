"""Localization scorer: S_loc through the scorer equals the SPEC formula on hand-built cases."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.scorers.common import RegionInput, load_region
from services.scorers.localization.backends import Detection, Grounder, GroundingOptions, select
from services.scorers.localization.logic import LocalizationScorer, candidate_phrases
from services.scorers.localization.settings import LocalizationSettings
from spr.v1 import common_pb2, describer_pb2
from tests.scorers.conftest import CIRCLE, SQUARE, candidates, make_region, mention, scene_png


class FixedGrounder:
    """A grounder with known answers (test input, not a stand-in for product code): it returns the
    given boxes for the given phrases and records every call."""

    name = "fixed"

    def __init__(self, answers: dict[str, list[tuple[float, float, float, float]]]) -> None:
        self.answers = answers
        self.calls: list[tuple[tuple[float, float], list[str]]] = []

    def forward_passes(self, phrases: Sequence[str]) -> int:
        return 1

    def ground(
        self,
        image: Image.Image,
        offset: tuple[float, float],
        phrases: Sequence[str],
        deadline: float | None = None,
    ) -> list[list[Detection]]:
        self.calls.append((offset, list(phrases)))
        return [[Detection(b, 0.9) for b in self.answers.get(p, [])] for p in phrases]


def region_input() -> RegionInput:
    return load_region(make_region(), scene_png(), LocalizationSettings().images)


def scorer(grounder: Grounder, **settings: object) -> LocalizationScorer:
    return LocalizationScorer(LocalizationSettings(model="fixed", **settings), grounder)  # type: ignore[arg-type]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU written out by hand (independent of services.core) for the expected values."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def cand(cid: str, *mentions: common_pb2.Mention, text: str = "") -> describer_pb2.Candidate:
    return describer_pb2.Candidate(candidate_id=cid, text=text, mentions=list(mentions))


def test_s_loc_equals_the_formula_with_own_and_grounded_boxes() -> None:
    circle, square = (20.0, 20.0, 80.0, 80.0), (110.0, 60.0, 170.0, 120.0)
    shifted = (30.0, 20.0, 90.0, 80.0)  # the circle, 10 px to the right
    grounded_square = (110.0, 70.0, 170.0, 130.0)
    grounder = FixedGrounder({"blue square": [grounded_square]})
    cands = [
        cand("own-exact", mention("red circle", CIRCLE), mention("blue square", SQUARE)),
        cand(
            "shifted+grounded",
            mention("red circle", common_pb2.Box(x1=30, y1=20, x2=90, y2=80)),
            mention("blue square"),
        ),
        cand("nothing", mention("a dog")),
    ]
    got = scorer(grounder).score(region_input(), cands)
    expected_1 = (
        max(iou(circle, shifted), iou(circle, grounded_square))
        + max(iou(square, shifted), iou(square, grounded_square))
    ) / 2
    assert got[0].s_loc == pytest.approx(1.0)
    assert got[1].s_loc == pytest.approx(expected_1)
    assert list(got[1].best_iou_per_gt) == pytest.approx([iou(circle, shifted), iou(square, grounded_square)])
    assert got[2].s_loc == 0.0 and list(got[2].best_iou_per_gt) == [0.0, 0.0]
    assert [c.model_box_count for c in got] == [2, 1, 0]
    assert [b.phrase for b in got[1].grounded] == ["blue square"]


def test_floor_and_precision_options_follow_the_formula() -> None:
    shifted = (30.0, 20.0, 90.0, 80.0)
    lamp = (150.0, 0.0, 199.0, 20.0)
    grounder = FixedGrounder({"lamp": [lamp]})
    c = cand("c", mention("red circle", common_pb2.Box(x1=30, y1=20, x2=90, y2=80)), mention("lamp"))
    floored = scorer(grounder, iou_floor=0.8).score(region_input(), [c])[0]
    circle_iou = iou((20, 20, 80, 80), shifted)
    assert circle_iou < 0.8
    assert floored.s_loc == 0.0
    weighted = scorer(grounder, precision_weight=0.5).score(region_input(), [c])[0]
    precision = 0.5  # shifted matches the circle at IoU >= 0.5, the lamp matches nothing
    assert circle_iou >= 0.5
    assert weighted.s_loc == pytest.approx(0.5 * (circle_iou / 2) + 0.5 * precision)
    assert weighted.precision_term == pytest.approx(0.5 * precision)


def test_all_phrases_of_all_candidates_are_grounded_once_on_the_crop() -> None:
    grounder = FixedGrounder({})
    scorer(grounder).score(region_input(), candidates(8))
    assert len(grounder.calls) == 1
    offset, phrases = grounder.calls[0]
    assert offset == (10.0, 10.0)  # the crop's corner: boxes come back in full-image pixels
    assert len(phrases) == len(set(phrases))
    assert "red circle" in phrases and "a lamp" in phrases
    assert "A red circle left of a blue square." in phrases  # mention-less candidate: its sentences


def test_phrases_are_extracted_without_boxes() -> None:
    c = cand("c", mention("red  circle"), mention("Red circle"), mention("blue square"), text="x")
    assert candidate_phrases(c, 16) == ["red circle", "blue square"]
    assert candidate_phrases(cand("d", text="One thing. Two things!"), 16) == ["One thing.", "Two things!"]


@pytest.mark.parametrize("name", ["tiny-grounding-dino", "tiny-owlv2"])
def test_real_grounders_in_one_pass_and_exact_own_boxes_score_one(
    name: str, tiny_models: dict[str, Path]
) -> None:
    s = LocalizationScorer(LocalizationSettings(model=str(tiny_models[name]), box_threshold=0.0))
    cands = candidates(8)
    phrases = list(dict.fromkeys(p for c in cands for p in candidate_phrases(c, 16)))
    assert s.grounder.forward_passes(phrases) == 1
    got = s.score(region_input(), cands)
    assert got[0].s_loc == pytest.approx(1.0)  # own boxes are the GT boxes: grounding cannot lower it
    assert got[2].grounded, "a candidate without mentions still gets its text grounded"
    for score in got:
        assert 0.0 <= score.s_loc <= 1.0
        for box in score.grounded:  # grounded boxes lie inside the region crop, in full-image pixels
            assert 10 - 1e-6 <= box.box.x1 <= box.box.x2 <= 180 + 1e-6
            assert 10 - 1e-6 <= box.box.y1 <= box.box.y2 <= 130 + 1e-6
    assert np.isfinite([b.confidence for sc in got for b in sc.grounded]).all()


def test_grounding_dino_packs_long_phrase_lists_into_more_passes(tiny_models: dict[str, Path]) -> None:
    s = LocalizationScorer(LocalizationSettings(model=str(tiny_models["tiny-grounding-dino"])))
    many = [f"object number {i} with a rather long description" for i in range(60)]
    passes = s.grounder.forward_passes(many)
    assert passes > 1
    detections = s.grounder.ground(Image.new("RGB", (64, 48)), (0.0, 0.0), many)
    assert len(detections) == len(many)


def test_select_keeps_the_best_boxes_per_phrase_in_full_image_pixels() -> None:
    scores = np.array([[0.2, 0.9], [0.8, 0.9], [0.5, 0.1], [0.8, 0.95]], dtype=np.float32)
    boxes = np.array(
        [[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.9, 0.9, 0.4, 0.4]]
    )
    options = GroundingOptions(box_threshold=0.5, max_boxes_per_phrase=2)
    first, second = select(scores.astype(np.float32), boxes.astype(np.float32), (100, 50), (10, 20), options)
    # Phrase 0: boxes 1 and 3 tie at 0.8 (lower index first); box 2 (0.5) is cut by the cap of 2.
    assert [d.score for d in first] == pytest.approx([0.8, 0.8])
    assert first[0].box == pytest.approx((10.0, 20.0, 60.0, 45.0))  # (0, 0, 50, 25) moved by the offset
    assert first[1].box == pytest.approx((80.0, 55.0, 110.0, 70.0))  # clipped at the frame's right/bottom
    assert [d.score for d in second] == pytest.approx([0.95, 0.9])
    assert select(scores[:, :0], boxes.astype(np.float32), (100, 50), (0, 0), options) == []
