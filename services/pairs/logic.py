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
from services.core.formats import Span, mention_boxes_in_image, rewrite_spans
from services.core.refine import (
    REFINE_IOU_THRESHOLD,
    BoxBatch,
    Frame,
    RefinedBatch,
    refinable,
    refine_batch,
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
    makes it undecidable (which leaves the others unaffected); a :class:`RecordsMismatch` when the
    score records do not name the description's candidates.

    Refinement's numeric work is done for all of them together (:func:`refine_batch`): the pair
    builder decides every region a poll completed in one call.
    """
    boxes = BoxBatch()
    prepared = [_prepare(*region, rules, boxes) for region in regions]
    refined = refine_batch(boxes, rules.iou_floor, rules.refine_iou)
    decisions: list[pairs_pb2.PairDecision | ValueError] = []
    refined_region = 0  # the next region of `refined`
    for region in prepared:
        if isinstance(region, ValueError):
            decisions.append(region)
            continue
        first = -1  # the region's first candidate in `refined`; -1: nothing refined
        if region.fmt is not None:
            first, refined_region = refined.region_cands[refined_region], refined_region + 1
        try:
            best = _best_refined(region, refined, first, rules) if first >= 0 else []
            choice = select_pair(region.initial, best, rules.delta)
            decisions.append(_decision(region.record, region.localization, region.semantic, choice, rules))
        except ValueError as exc:
            decisions.append(exc)
    return decisions


class RecordsMismatch(ValueError):
    """The records of one region do not belong together: the score records must name exactly the
    description's candidates (checked by :func:`decide_all`, which raises this) and carry its run id
    (:func:`run_mismatch`). Scores of another description of the region (a retried describer) or of
    another run must not be joined."""


def run_mismatch(
    record: describer_pb2.DescriptionRecord,
    localization: scoring_pb2.LocalizationScoreRecord,
    semantic: scoring_pb2.SemanticScoreRecord | None,
) -> str:
    """Why the records of one region are of different runs ('' when they are not).

    The other half of :class:`RecordsMismatch`, the candidate ids, is checked by :func:`decide_all`,
    which reads those ids anyway (reading them twice was a tenth of a decision).
    """
    run_id = record.lineage.run_id
    for name, scored in (("localization", localization), ("semantic", semantic)):
        if scored is not None and scored.lineage.run_id != run_id:
            return f"{name} scores are of run {scored.lineage.run_id!r}, the description of run {run_id!r}"
    return ""


def _scores_by_id(scored: Any, name: str, ids: list[str]) -> dict[str, Any]:
    """A score record's scores by candidate id (the last of repeated ids); raises
    :class:`RecordsMismatch` unless they name exactly the description's candidates ``ids``."""
    scores = list(scored.scores)
    named = [s.candidate_id for s in scores]
    # A failure record names no candidates (see upstream_failed); the scorers keep the order, others may not.
    if not scored.HasField("error") and named != ids and sorted(named) != sorted(ids):
        raise RecordsMismatch(f"{name} scores name candidates {named[:4]}..., the description {ids[:4]}...")
    return dict(zip(named, scores, strict=True))


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


@dataclass(frozen=True)
class _Prepared:
    """One region's records with its initial candidates scored; its boxes went to the batch."""

    record: describer_pb2.DescriptionRecord
    localization: scoring_pb2.LocalizationScoreRecord
    semantic: scoring_pb2.SemanticScoreRecord | None
    candidates: list[int]  # those both scorers scored: indices into record.candidates
    initial: list[ScoredCandidate]
    fmt: CoordinateFormat | None  # its boxes' format; None: nothing to refine (no candidate, no frame)


Scored = list[tuple[int, describer_pb2.Candidate, scoring_pb2.LocalizationScore]]


def _prepare(
    record: describer_pb2.DescriptionRecord,
    localization: scoring_pb2.LocalizationScoreRecord,
    semantic: scoring_pb2.SemanticScoreRecord | None,
    rules: PairRules,
    boxes: BoxBatch,
) -> _Prepared | ValueError:
    """Scores the region's initial candidates and adds its boxes to ``boxes`` (unless it raises, e.g.
    :class:`RecordsMismatch`).

    Each protobuf field is read once (reading one costs more than the arithmetic on it).
    """
    try:
        if semantic is None and rules.lambda_sem != 0:
            raise ValueError("a semantic score record is required unless lambda_sem == 0")
        candidates = list(record.candidates)
        all_ids = [c.candidate_id for c in candidates]
        loc = _scores_by_id(localization, "localization", all_ids)
        sem = _scores_by_id(semantic, "semantic", all_ids) if semantic is not None else {}
        scored: Scored = []
        ids = []
        for index, (c, candidate_id) in enumerate(zip(candidates, all_ids, strict=True)):
            found = loc.get(candidate_id)
            if found is not None and (semantic is None or candidate_id in sem):
                scored.append((index, c, found))
                ids.append(candidate_id)
        lam = rules.lambda_sem
        initial = []
        for (_, c, found), candidate_id in zip(scored, ids, strict=True):
            s_sem = sem[candidate_id].s_sem if semantic is not None else 0.0
            s_loc = found.s_loc
            initial.append(ScoredCandidate(candidate_id, c.text, s_sem, s_loc, reward(s_sem, s_loc, lam)))
        fmt = _add_boxes(record, scored, boxes)
    except ValueError as exc:
        return exc
    return _Prepared(record, localization, semantic, [i for i, _, _ in scored], initial, fmt)


def _add_boxes(
    record: describer_pb2.DescriptionRecord, scored: Scored, batch: BoxBatch
) -> CoordinateFormat | None:
    """Adds the region to the batch as :class:`RegionBoxes` would (own boxes in full-image pixels, then
    the grounded ones, per candidate); returns its format, or None when it has nothing to refine."""
    if not scored:
        return None
    frame_w, frame_h = record.frame_width, record.frame_height
    if not frame_w or not frame_h:
        return None
    crop = Box(*_box(record.crop_box))
    rows: list[float] = []
    own_counts, found_counts = [], []
    for _, c, found in scored:
        own_counts.append(_add_own_boxes(c, crop, frame_w, frame_h, rows))
        count = 0
        for g in found.grounded:
            b = g.box
            rows += (b.x1, b.y1, b.x2, b.y2)
            count += 1
        found_counts.append(count)
    gt: list[float] = []
    for o in record.region.ground_truth:
        b = o.box
        gt += (b.x1, b.y1, b.x2, b.y2)
    fmt = CoordinateFormat(scored[0][1].coordinate_format)
    batch.rows += rows
    batch.own_counts += own_counts
    batch.found_counts += found_counts
    batch.candidates.append(len(scored))
    batch.gt += gt
    batch.gt_counts.append(len(gt) // 4)
    batch.frames.append(Frame(fmt, crop, frame_w, frame_h))
    return fmt


def _best_refined(
    region: _Prepared, refined: RefinedBatch, first: int, rules: PairRules
) -> list[ScoredCandidate]:
    """The best refined candidate, the only one `select_pair` can choose ([] when none); its S_sem is
    carried over (see module doc). ``first``: the region's first candidate in ``refined``.

    Only that candidate's text is rewritten: scores need just the refined boxes.
    """
    initial, lam = region.initial, rules.lambda_sem
    s_locs = refined.s_loc[first : first + len(initial)]
    rewards = [lam * b.s_sem + (1.0 - lam) * s for b, s in zip(initial, s_locs, strict=True)]  # reward()
    best = max(range(len(rewards)), key=rewards.__getitem__)  # the first of equals, as select_pair
    matches = refined.matches(first + best)
    text = initial[best].text
    if matches:
        assert region.fmt is not None  # refined scores exist only for a region with boxes
        record = region.record
        candidate = record.candidates[region.candidates[best]]
        spans = _boxed_spans(candidate, record.frame_width, record.frame_height)
        edits = [(spans[row], replacement.native) for row, replacement in matches.items()]
        text = rewrite_spans(text, edits, region.fmt)
    return [
        ScoredCandidate(
            candidate_id=initial[best].candidate_id + "/refined",
            text=text,
            s_sem=initial[best].s_sem,
            s_loc=s_locs[best],
            reward=rewards[best],
            refined=True,
            boxes_replaced=len(matches),
        )
    ]


def _boxed_spans(candidate: describer_pb2.Candidate, frame_w: int, frame_h: int) -> list[Span]:
    """Spans of the candidate's box markups, one per row of its own boxes (its boxed mentions)."""
    mentions = candidate.mentions
    if mentions:
        return [(m.char_start, m.char_end) for m in mentions if m.has_box]
    fmt = CoordinateFormat(candidate.coordinate_format)
    parsed = parse(candidate.text, fmt, frame_w, frame_h).mentions
    return [m.span for m in parsed if m.box is not None and m.span is not None]


def _add_own_boxes(
    candidate: describer_pb2.Candidate, crop: Box, frame_w: int, frame_h: int, rows: list[float]
) -> int:
    """Appends the full-image boxes of the candidate's boxed mentions to ``rows``, in mention order;
    returns how many.

    The describer sends them already parsed (full-image pixels); a record without mentions (a producer
    that does not fill them) is parsed here. Parsing every text again was ~40 % of a decision.
    """
    mentions = candidate.mentions
    if mentions:
        count = 0
        for m in mentions:
            if m.has_box:
                b = m.box
                rows += (b.x1, b.y1, b.x2, b.y2)
                count += 1
        return count
    fmt = CoordinateFormat(candidate.coordinate_format)
    parsed = parse(candidate.text, fmt, frame_w, frame_h).mentions
    boxes = mention_boxes_in_image([parsed[i] for i in refinable(parsed)], crop, frame_w, frame_h)
    rows += boxes.ravel().tolist()
    return len(boxes)


def _write_scored_text(target: pairs_pb2.ScoredText, c: ScoredCandidate) -> None:
    target.candidate_id = c.candidate_id
    target.text = c.text
    target.reward = c.reward
    target.s_loc = c.s_loc
    target.s_sem = c.s_sem
    target.refined = c.refined
    target.boxes_replaced = c.boxes_replaced


def _write_lineage(
    target: common_pb2.Lineage,
    record: describer_pb2.DescriptionRecord,
    localization: scoring_pb2.LocalizationScoreRecord,
    semantic: scoring_pb2.SemanticScoreRecord | None,
    rules: PairRules,
) -> None:
    target.CopyFrom(record.lineage)
    target.localization_scorer_id = localization.lineage.localization_scorer_id
    if semantic is not None:
        target.semantic_scorer_id = semantic.lineage.semantic_scorer_id
    target.run_id = rules.run_id


def _decision(
    record: describer_pb2.DescriptionRecord,
    localization: scoring_pb2.LocalizationScoreRecord,
    semantic: scoring_pb2.SemanticScoreRecord | None,
    choice: PairChoice | SkipDecision,
    rules: PairRules,
) -> pairs_pb2.PairDecision:
    """The decision, written in place: passing sub-messages to a constructor copies them (a third of
    this function's time when the pair was built apart and then copied into the decision)."""
    region_id = record.region.region_id
    decision = pairs_pb2.PairDecision(region_id=region_id)
    _write_lineage(decision.lineage, record, localization, semantic, rules)
    if isinstance(choice, SkipDecision):
        decision.skip = pairs_pb2.SkipReason.Value(f"SKIP_REASON_{choice.reason.name}")
        decision.detail = choice.detail
        return decision
    pair = decision.pair
    pair.pair_id = pair_id(region_id, rules.run_id)
    pair.region_id = region_id
    pair.region.CopyFrom(record.region)
    pair.prompt = record.prompt
    pair.prompt_mode = record.prompt_mode
    _write_scored_text(pair.chosen, choice.chosen)
    _write_scored_text(pair.rejected, choice.rejected)
    pair.margin = choice.margin
    pair.lambda_sem = rules.lambda_sem
    pair.delta = rules.delta
    pair.refine_iou = rules.refine_iou
    if rules.iou_floor is not None:  # optional field: unset means no floor
        pair.iou_floor = rules.iou_floor
    pair.lineage.CopyFrom(decision.lineage)
    return decision
