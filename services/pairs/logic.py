"""Pair decisions for one region, from its descriptions and their scores. No transport here.

SPEC section 2, "Refinement" and "Pairs":
- every candidate is refined (boxes matching a GT box with IoU > 0.5 replaced by that GT box, in the
  model's own format) and its `S_loc` recomputed against GT, with P = the refined candidate's own
  boxes plus the boxes the grounding model found for the original candidate's phrases;
- chosen = the best refined candidate, rejected = the lowest-scored initial candidate; skip when
  the margin is below delta or both texts are the same.

Semantic score of a refined text (the choice the streaming issue asks to document): refinement only
rewrites box coordinates, never words, and the semantic scorers judge what the text says about the
image region, so a refined candidate keeps its original candidate's `S_sem`. Re-scoring would cost a
second semantic pass per region for a number that differs only through how an encoder tokenises digits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.core import (
    Box,
    CoordinateFormat,
    PairChoice,
    ScoredCandidate,
    SkipDecision,
    pair_id,
    parse,
    reward,
    select_pair,
)
from services.core.boxes import image_to_frame
from services.core.formats import Mention, mention_boxes_in_image, rewrite_mentions
from services.core.refine import (
    REFINE_IOU_THRESHOLD,
    Frame,
    RefinedScore,
    RegionBoxes,
    refinable,
    refine_regions,
)
from spr.v1 import common_pb2, describer_pb2, pairs_pb2, scoring_pb2


@dataclass(frozen=True)
class PairRules:
    """The knobs of pair selection; defaults as in the paper."""

    lambda_sem: float = 0.8  # S = λ·S_sem + (1 − λ)·S_loc
    delta: float = 0.05  # minimum reward margin between chosen and rejected
    iou_floor: float | None = None  # IoUs below it count as 0 in S_loc
    refine_iou: float = REFINE_IOU_THRESHOLD  # a box matching a GT box above this IoU takes its place
    run_id: str = ""  # keeps replays with other scorer versions apart


def _box(box: common_pb2.Box) -> tuple[float, float, float, float]:
    return (box.x1, box.y1, box.x2, box.y2)


def _by_candidate(scores: list, ids: list[str]) -> dict[str, object]:  # type: ignore[type-arg]
    found = {s.candidate_id: s for s in scores}
    return {i: found[i] for i in ids if i in found}


RegionRecords = tuple[
    describer_pb2.DescriptionRecord,
    scoring_pb2.LocalizationScoreRecord,
    scoring_pb2.SemanticScoreRecord | None,
]


def decide(
    record: describer_pb2.DescriptionRecord,
    localization: scoring_pb2.LocalizationScoreRecord,
    semantic: scoring_pb2.SemanticScoreRecord | None,
    rules: PairRules,
) -> pairs_pb2.PairDecision:
    """Exactly one decision for the region of `record`: a pair, or a skip with its reason.

    Raises ValueError for records it cannot decide (an unknown coordinate format, a non-finite score).
    """
    (decision,) = decide_all([(record, localization, semantic)], rules)
    if isinstance(decision, ValueError):
        raise decision
    return decision


def decide_all(
    regions: Sequence[RegionRecords], rules: PairRules
) -> list[pairs_pb2.PairDecision | ValueError]:
    """:func:`decide` for many regions at once, in order: each gets its decision, or the ValueError that
    makes it undecidable (which leaves the others unaffected).

    Refinement's numeric work is done for all of them together (:func:`refine_regions`): the pair
    builder decides every region a poll completed in one call.
    """
    prepared = [_prepare(*region, rules) for region in regions]
    boxes = [p.boxes for p in prepared if isinstance(p, _Prepared) and p.boxes is not None]
    refined = iter(refine_regions(boxes, rules.iou_floor, rules.refine_iou))
    decisions: list[pairs_pb2.PairDecision | ValueError] = []
    for region in prepared:
        if isinstance(region, ValueError):
            decisions.append(region)
            continue
        scores = next(refined) if region.boxes is not None else []
        try:
            choice = select_pair(region.initial, _best_refined(region, scores, rules), rules.delta)
            decisions.append(_decision(region.record, region.localization, region.semantic, choice, rules))
        except ValueError as exc:
            decisions.append(exc)
    return decisions


def mismatch(
    record: describer_pb2.DescriptionRecord,
    localization: scoring_pb2.LocalizationScoreRecord,
    semantic: scoring_pb2.SemanticScoreRecord | None,
) -> str:
    """Why the records of one region do not belong together ('' when they do).

    The score records must name exactly the description's candidates and carry its run id: scores of
    another description of the region (a retried describer) or of another run must not be joined.
    """
    ids = [c.candidate_id for c in record.candidates]
    run_id = record.lineage.run_id
    scores: list[tuple[str, Any]] = [("localization", localization)]
    if semantic is not None:
        scores.append(("semantic", semantic))
    for name, scored in scores:
        if scored.lineage.run_id != run_id:
            return f"{name} scores are of run {scored.lineage.run_id!r}, the description of run {run_id!r}"
        if scored.HasField("error"):
            continue  # a failure record names no candidates (see upstream_failed)
        named = [s.candidate_id for s in scored.scores]
        if named != ids and sorted(named) != sorted(ids):  # the scorers keep the order; others may not
            return f"{name} scores name candidates {named[:4]}..., the description {ids[:4]}..."
    return ""


@dataclass(frozen=True)
class UpstreamFailure:
    """A stage before the pair builder failed on the region and said so in its record."""

    skip: pairs_pb2.SkipReason.ValueType  # DESCRIBE_FAILED or SCORING_FAILED
    error: common_pb2.ErrorInfo


def upstream_failure(
    description: describer_pb2.DescriptionRecord,
    localization: scoring_pb2.LocalizationScoreRecord,
    semantic: scoring_pb2.SemanticScoreRecord | None,
) -> UpstreamFailure | None:
    """The describer's error, else the first scorer's, when a record of the region carries one."""
    if description.HasField("error"):  # the scorers passed it on without scoring
        return UpstreamFailure(pairs_pb2.SKIP_REASON_DESCRIBE_FAILED, description.error)
    for scored in (localization, semantic):
        if scored is not None and scored.HasField("error"):
            return UpstreamFailure(pairs_pb2.SKIP_REASON_SCORING_FAILED, scored.error)
    return None


def upstream_failed(
    record: describer_pb2.DescriptionRecord, failure: UpstreamFailure, rules: PairRules
) -> pairs_pb2.PairDecision:
    """The decision of a region a stage before the builder failed on: a skip naming the error."""
    error = failure.error
    return pairs_pb2.PairDecision(
        region_id=record.region.region_id,
        skip=failure.skip,
        detail=f"{error.stage}: {error.code} {error.message}",
        lineage=_skip_lineage(record, rules),
    )


def timed_out(
    region_id: str,
    record: describer_pb2.DescriptionRecord | None,
    missing: Sequence[str],
    waited_s: float,
    rules: PairRules,
) -> pairs_pb2.PairDecision:
    """The decision of a region whose records did not all arrive in time: a SCORES_TIMED_OUT skip."""
    return pairs_pb2.PairDecision(
        region_id=region_id,
        skip=pairs_pb2.SKIP_REASON_SCORES_TIMED_OUT,
        detail=f"no {', '.join(missing)} record after {waited_s:.1f}s",
        lineage=_skip_lineage(record, rules),
    )


def _skip_lineage(record: describer_pb2.DescriptionRecord | None, rules: PairRules) -> common_pb2.Lineage:
    """A skip decided by the join (no scores to stamp): the description's lineage under this run."""
    lineage = common_pb2.Lineage()
    if record is not None:
        lineage.CopyFrom(record.lineage)
    lineage.run_id = rules.run_id
    return lineage


def _initial(
    candidate: describer_pb2.Candidate,
    loc: scoring_pb2.LocalizationScore,
    sem: scoring_pb2.SemanticScore | None,
    rules: PairRules,
) -> ScoredCandidate:
    s_sem = sem.s_sem if sem is not None else 0.0
    return ScoredCandidate(
        candidate_id=candidate.candidate_id,
        text=candidate.text,
        s_sem=s_sem,
        s_loc=loc.s_loc,
        reward=reward(s_sem, loc.s_loc, rules.lambda_sem),
        refined=False,
    )


@dataclass(frozen=True)
class _Prepared:
    """One region's records with its initial candidates scored and its boxes ready for refinement."""

    record: describer_pb2.DescriptionRecord
    localization: scoring_pb2.LocalizationScoreRecord
    semantic: scoring_pb2.SemanticScoreRecord | None
    candidates: list[describer_pb2.Candidate]  # those both scorers scored
    initial: list[ScoredCandidate]
    boxes: RegionBoxes | None  # None: nothing to refine (no candidate, or no frame size)


def _prepare(
    record: describer_pb2.DescriptionRecord,
    localization: scoring_pb2.LocalizationScoreRecord,
    semantic: scoring_pb2.SemanticScoreRecord | None,
    rules: PairRules,
) -> _Prepared | ValueError:
    try:
        if semantic is None and rules.lambda_sem != 0:
            raise ValueError("a semantic score record is required unless lambda_sem == 0")
        ids = [c.candidate_id for c in record.candidates]
        loc = _by_candidate(list(localization.scores), ids)
        sem = _by_candidate(list(semantic.scores), ids) if semantic is not None else {}
        scored = [
            c
            for c in record.candidates
            if c.candidate_id in loc and (semantic is None or c.candidate_id in sem)
        ]
        initial = [_initial(c, loc[c.candidate_id], sem.get(c.candidate_id), rules) for c in scored]  # type: ignore[arg-type]
        boxes = _region_boxes(record, scored, loc)  # type: ignore[arg-type]
    except ValueError as exc:
        return exc
    return _Prepared(record, localization, semantic, scored, initial, boxes)


def _region_boxes(
    record: describer_pb2.DescriptionRecord,
    candidates: list[describer_pb2.Candidate],
    loc: dict[str, scoring_pb2.LocalizationScore],
) -> RegionBoxes | None:
    if not candidates or not record.frame_width or not record.frame_height:
        return None
    frame_w, frame_h = record.frame_width, record.frame_height
    crop = Box(*_box(record.crop_box))
    return RegionBoxes(
        own=[_boxes_in_image(c, crop, frame_w, frame_h) for c in candidates],
        grounded=[
            [(b.x1, b.y1, b.x2, b.y2) for g in loc[c.candidate_id].grounded for b in (g.box,)]
            for c in candidates
        ],
        gt=[(b.x1, b.y1, b.x2, b.y2) for o in record.region.ground_truth for b in (o.box,)],
        frame=Frame(CoordinateFormat(candidates[0].coordinate_format), crop, frame_w, frame_h),
    )


def _best_refined(region: _Prepared, refined: list[RefinedScore], rules: PairRules) -> list[ScoredCandidate]:
    """The best refined candidate, the only one `select_pair` can choose ([] when none); its S_sem is
    carried over (see module doc).

    Only that candidate's text is rewritten: scores need just the refined boxes.
    """
    if not refined:
        return []
    initial = region.initial
    rewards = [
        reward(b.s_sem, score.s_loc, rules.lambda_sem) for b, score in zip(initial, refined, strict=True)
    ]
    best = max(range(len(rewards)), key=rewards.__getitem__)  # the first of equals, as select_pair
    candidate, record = region.candidates[best], region.record
    crop = Box(*_box(record.crop_box))
    mentions = _frame_mentions(candidate, crop, record.frame_width, record.frame_height)
    rows = refinable(mentions)
    new_boxes = {rows[row]: r.native for row, r in refined[best].matches.items()}
    assert region.boxes is not None  # refined scores exist only for a region with boxes
    text, _ = rewrite_mentions(candidate.text, mentions, new_boxes, region.boxes.frame.fmt)
    return [
        ScoredCandidate(
            candidate_id=candidate.candidate_id + "/refined",
            text=text,
            s_sem=initial[best].s_sem,
            s_loc=refined[best].s_loc,
            reward=rewards[best],
            refined=True,
            boxes_replaced=len(refined[best].matches),
        )
    ]


def _boxes_in_image(
    candidate: describer_pb2.Candidate, crop: Box, frame_w: int, frame_h: int
) -> list[tuple[float, float, float, float]]:
    """Full-image boxes of the candidate's boxed mentions, in mention order.

    The describer sends them already parsed (full-image pixels); a record without mentions (a producer
    that does not fill them) is parsed here. Parsing every text again was ~40 % of a decision.
    """
    if candidate.mentions:
        return [(b.x1, b.y1, b.x2, b.y2) for m in candidate.mentions if m.has_box for b in (m.box,)]
    mentions = _frame_mentions(candidate, crop, frame_w, frame_h)
    boxes = mention_boxes_in_image([mentions[i] for i in refinable(mentions)], crop, frame_w, frame_h)
    return [(x1, y1, x2, y2) for x1, y1, x2, y2 in boxes.tolist()]


def _frame_mentions(
    candidate: describer_pb2.Candidate, crop: Box, frame_w: int, frame_h: int
) -> list[Mention]:
    """The candidate's mentions with boxes in the model's frame, as ``parse(candidate.text)`` gives them
    (moved back from the describer's full-image mentions when it sent them)."""
    if not candidate.mentions:
        return parse(candidate.text, CoordinateFormat(candidate.coordinate_format), frame_w, frame_h).mentions
    return [
        Mention(
            m.phrase, image_to_frame(Box(*_box(m.box)), crop, frame_w, frame_h), (m.char_start, m.char_end)
        )
        if m.has_box
        else Mention(m.phrase)
        for m in candidate.mentions
    ]


def _scored_text(c: ScoredCandidate) -> pairs_pb2.ScoredText:
    return pairs_pb2.ScoredText(
        candidate_id=c.candidate_id,
        text=c.text,
        reward=c.reward,
        s_loc=c.s_loc,
        s_sem=c.s_sem,
        refined=c.refined,
        boxes_replaced=c.boxes_replaced,
    )


def _lineage(
    record: describer_pb2.DescriptionRecord,
    localization: scoring_pb2.LocalizationScoreRecord,
    semantic: scoring_pb2.SemanticScoreRecord | None,
    rules: PairRules,
) -> common_pb2.Lineage:
    lineage = common_pb2.Lineage()
    lineage.CopyFrom(record.lineage)
    lineage.localization_scorer_id = localization.lineage.localization_scorer_id
    if semantic is not None:
        lineage.semantic_scorer_id = semantic.lineage.semantic_scorer_id
    lineage.run_id = rules.run_id
    return lineage


def _decision(
    record: describer_pb2.DescriptionRecord,
    localization: scoring_pb2.LocalizationScoreRecord,
    semantic: scoring_pb2.SemanticScoreRecord | None,
    choice: PairChoice | SkipDecision,
    rules: PairRules,
) -> pairs_pb2.PairDecision:
    region_id = record.region.region_id
    lineage = _lineage(record, localization, semantic, rules)
    if isinstance(choice, SkipDecision):
        return pairs_pb2.PairDecision(
            region_id=region_id,
            skip=pairs_pb2.SkipReason.Value(f"SKIP_REASON_{choice.reason.name}"),
            detail=choice.detail,
            lineage=lineage,
        )
    pair = pairs_pb2.PreferencePair(
        pair_id=pair_id(region_id, rules.run_id),
        region_id=region_id,
        region=record.region,
        prompt=record.prompt,
        prompt_mode=record.prompt_mode,
        chosen=_scored_text(choice.chosen),
        rejected=_scored_text(choice.rejected),
        margin=choice.margin,
        lambda_sem=rules.lambda_sem,
        delta=rules.delta,
        refine_iou=rules.refine_iou,
        iou_floor=rules.iou_floor,
        lineage=lineage,
    )
    return pairs_pb2.PairDecision(region_id=region_id, pair=pair, lineage=lineage)
