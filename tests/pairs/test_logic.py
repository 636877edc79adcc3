"""Pair decisions from hand-built records: refinement, the margin rule, lineage, idempotent ids."""

from __future__ import annotations

import pytest

from services.core import Box, CoordinateFormat, render_box
from services.pairs.logic import PairRules, decide, decide_all
from spr.v1 import common_pb2, describer_pb2, pairs_pb2, scoring_pb2
from tests.pairs import records
from tests.pairs.stream import region_messages

FMT = CoordinateFormat.BRACKET_999
GT = (10.0, 10.0, 50.0, 50.0)
CROP = Box(0.0, 0.0, 100.0, 100.0)  # the model saw the full 100x100 image at its own size


def _pb_box(box: tuple[float, float, float, float]) -> common_pb2.Box:
    return common_pb2.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3])


def _record(texts: list[str]) -> describer_pb2.DescriptionRecord:
    region = common_pb2.Region(
        region_id="world/1/r1",
        box=_pb_box((0, 0, 100, 100)),
        ground_truth=[common_pb2.AnnotatedObject(annotation_id=1, category="red circle", box=_pb_box(GT))],
    )
    candidates = [
        describer_pb2.Candidate(candidate_id=f"c{i}", sample_index=i, text=t, coordinate_format=FMT.value)
        for i, t in enumerate(texts)
    ]
    return describer_pb2.DescriptionRecord(
        region=region,
        candidates=candidates,
        lineage=common_pb2.Lineage(adapter_version="spr-v1-aaaa0000", prompt_template_id="t/v1"),
        crop_box=_pb_box(CROP.as_tuple()),
        frame_width=100,
        frame_height=100,
        prompt="Describe.",
    )


def _loc(record: describer_pb2.DescriptionRecord, s_locs: list[float]) -> scoring_pb2.LocalizationScoreRecord:
    scores = [
        scoring_pb2.LocalizationScore(candidate_id=c.candidate_id, s_loc=s)
        for c, s in zip(record.candidates, s_locs, strict=True)
    ]
    return scoring_pb2.LocalizationScoreRecord(
        region_id=record.region.region_id,
        scores=scores,
        lineage=common_pb2.Lineage(localization_scorer_id="gdino@1"),
    )


def _sem(record: describer_pb2.DescriptionRecord, s_sems: list[float]) -> scoring_pb2.SemanticScoreRecord:
    scores = [
        scoring_pb2.SemanticScore(candidate_id=c.candidate_id, s_sem=s)
        for c, s in zip(record.candidates, s_sems, strict=True)
    ]
    return scoring_pb2.SemanticScoreRecord(
        region_id=record.region.region_id,
        scores=scores,
        lineage=common_pb2.Lineage(semantic_scorer_id="clip@1"),
    )


def _text(box: tuple[float, float, float, float]) -> str:
    return f"a red circle {render_box(Box(*box), FMT, 100, 100)} on grass."


def test_refined_near_miss_is_chosen_and_lowest_initial_is_rejected() -> None:
    near, far = _text((12, 12, 52, 50)), _text((60, 60, 90, 90))
    record = _record([near, far, "a blurry picture."])
    decision = decide(
        record, _loc(record, [0.8, 0.0, 0.0]), _sem(record, [0.5, 0.5, 0.1]), PairRules(run_id="r1")
    )
    assert decision.WhichOneof("decision") == "pair"
    pair = decision.pair
    assert pair.chosen.refined and pair.chosen.s_loc == pytest.approx(
        1.0, abs=0.01
    )  # GT box, on the 0-999 grid
    assert render_box(Box(*GT), FMT, 100, 100) in pair.chosen.text
    assert pair.chosen.text.startswith("a red circle ") and pair.chosen.text.endswith(" on grass.")
    assert pair.rejected.candidate_id == "c2" and not pair.rejected.refined
    assert pair.chosen.reward == pytest.approx(0.8 * 0.5 + 0.2 * pair.chosen.s_loc)
    assert pair.margin == pytest.approx(pair.chosen.reward - pair.rejected.reward)
    assert pair.lineage.adapter_version == "spr-v1-aaaa0000"
    assert (pair.lineage.localization_scorer_id, pair.lineage.semantic_scorer_id) == ("gdino@1", "clip@1")
    again = decide(
        record, _loc(record, [0.8, 0.0, 0.0]), _sem(record, [0.5, 0.5, 0.1]), PairRules(run_id="r1")
    )
    assert again.pair.pair_id == pair.pair_id
    other_run = decide(
        record, _loc(record, [0.8, 0.0, 0.0]), _sem(record, [0.5, 0.5, 0.1]), PairRules(run_id="r2")
    )
    assert other_run.pair.pair_id != pair.pair_id


def test_small_margin_and_missing_scores_are_skips_with_reasons() -> None:
    record = _record(["a red circle.", "a red circle!"])
    decision = decide(record, _loc(record, [0.0, 0.0]), _sem(record, [0.50, 0.49]), PairRules())
    assert decision.skip == pairs_pb2.SKIP_REASON_MARGIN_BELOW_DELTA
    assert "margin" in decision.detail
    lonely = _record(["only one"])
    assert decide(lonely, _loc(lonely, [0.0]), _sem(lonely, [0.1]), PairRules()).skip in (
        pairs_pb2.SKIP_REASON_TOO_FEW_CANDIDATES,
        pairs_pb2.SKIP_REASON_SAME_TEXT,
    )


def test_localization_only_rules_need_no_semantic_record() -> None:
    record = _record([_text((12, 12, 52, 50)), "nothing here."])
    decision = decide(record, _loc(record, [0.8, 0.0]), None, PairRules(lambda_sem=0.0))
    assert decision.pair.chosen.reward == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="semantic score record is required"):
        decide(record, _loc(record, [0.8, 0.0]), None, PairRules(lambda_sem=0.8))


def test_decisions_from_the_describers_mentions_equal_those_from_parsing_the_text() -> None:
    # The builder reuses the mentions the describer sent instead of parsing each text again; a record
    # without mentions is parsed. Both must give the same decision, refined texts and scores included.
    rules = PairRules(run_id="r")
    for index in range(40):
        record = records.description(f"world/{index}")
        loc, sem = records.localization(record), records.semantic(record)
        bare = describer_pb2.DescriptionRecord()
        bare.CopyFrom(record)
        for candidate in bare.candidates:
            del candidate.mentions[:]
        assert all(c.mentions for c in record.candidates)
        with_mentions, parsed = decide(record, loc, sem, rules), decide(bare, loc, sem, rules)
        assert with_mentions.WhichOneof("decision") == parsed.WhichOneof("decision")
        if with_mentions.HasField("pair"):
            assert with_mentions.pair.chosen.text == parsed.pair.chosen.text
            assert with_mentions.pair.chosen.s_loc == pytest.approx(parsed.pair.chosen.s_loc, abs=1e-9)
            assert with_mentions.pair.rejected.candidate_id == parsed.pair.rejected.candidate_id
        else:
            assert with_mentions.skip == parsed.skip


def test_refine_iou_sets_which_boxes_take_their_gt_box_and_the_pair_says_how_many() -> None:
    # A box at IoU 0.4 with the GT stays under the paper's 0.5 and is replaced under a lower threshold.
    near = _text((10, 10, 50, 26))
    record = _record([near, "a blurry picture."])
    loc, sem = _loc(record, [0.4, 0.0]), _sem(record, [0.5, 0.1])
    kept = decide(record, loc, sem, PairRules()).pair.chosen
    assert kept.refined and kept.boxes_replaced == 0 and kept.text == near
    assert kept.s_loc == pytest.approx(0.4, abs=0.01)
    replaced = decide(record, loc, sem, PairRules(refine_iou=0.3)).pair.chosen
    assert replaced.boxes_replaced == 1 and replaced.s_loc == pytest.approx(1.0, abs=0.01)
    assert render_box(Box(*GT), FMT, 100, 100) in replaced.text


def test_a_pair_records_every_rule_it_was_built_with() -> None:
    record = _record([_text(GT), "a blurry picture."])
    loc, sem = _loc(record, [1.0, 0.0]), _sem(record, [0.5, 0.1])
    pair = decide(record, loc, sem, PairRules(lambda_sem=0.5, delta=0.1, refine_iou=0.3, iou_floor=0.2)).pair
    assert (pair.lambda_sem, pair.delta, pair.refine_iou, pair.iou_floor) == (0.5, 0.1, 0.3, 0.2)
    default = decide(record, loc, sem, PairRules()).pair
    assert (default.delta, default.refine_iou) == (0.05, 0.5)
    assert not default.HasField("iou_floor")  # no floor, not a floor of 0


def test_deciding_regions_together_equals_deciding_each_and_isolates_a_bad_one() -> None:
    """decide_all (what the builder calls per poll) gives each region the decision decide gives it
    alone; a region it cannot decide gets its ValueError and leaves the others unaffected."""
    regions = [region_messages(f"world/{i}/r") for i in range(12)]
    bad_format = region_messages("world/bad/format")
    bad_format[0].candidates[0].coordinate_format = "no-such-format"
    bad_score = region_messages("world/bad/score")
    bad_score[2].scores[3].s_sem = float("inf")
    batch = [*regions[:5], bad_format, *regions[5:9], bad_score, *regions[9:]]
    rules = PairRules(run_id="r", iou_floor=0.3)

    decided = decide_all(batch, rules)

    assert isinstance(decided[5], ValueError) and "no-such-format" in str(decided[5])
    assert isinstance(decided[10], ValueError) and "non-finite" in str(decided[10])
    good = [d for i, d in enumerate(decided) if i not in (5, 10)]
    assert good == [decide(*region, rules) for region in regions]
    assert sum(d.WhichOneof("decision") == "pair" for d in good) > len(regions) // 2  # type: ignore[union-attr]
