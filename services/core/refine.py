"""Refinement (SPEC §2, "Refinement"): put the GT box in place of every box that nearly found it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import numpy.typing as npt

from services.core.boxes import Box, Coords, FloatArray, frame_to_image, image_to_frame, sanitize_box
from services.core.formats import (
    CoordinateFormat,
    Mention,
    NativeBox,
    mention_boxes_in_image,
    rewrite_mentions,
    to_native,
)
from services.core.scoring import as_box_array, box_iou

REFINE_IOU_THRESHOLD = 0.5


@dataclass(frozen=True, slots=True)
class RefineResult:
    text: str
    mentions: list[Mention]  # as parse(text) returns them: new boxes, spans shifted to the new text
    replaced_count: int  # boxes rewritten with their GT box (one already equal to it counts too)


def greedy_match(ious: FloatArray, threshold: float) -> list[tuple[int, int]]:
    """One-to-one ``(row, col)`` pairs with IoU > threshold, taken highest IoU first.

    Ties go to the earlier row, then the earlier column, so the result is deterministic.
    """
    return _greedy(ious.tolist(), threshold)


def _greedy(rows: Sequence[Sequence[float]], threshold: float) -> list[tuple[int, int]]:
    """:func:`greedy_match` on a matrix given as rows of Python floats."""
    # Plain Python: the matrices are small (boxes of one candidate x GT boxes), where numpy's per-call
    # overhead dominates. Sorting (-IoU, row, col) is the row-major tie-break order.
    ranked = sorted(
        (-iou, row, col)
        for row, values in enumerate(rows)
        for col, iou in enumerate(values)
        if iou > threshold
    )
    used_rows: set[int] = set()
    used_cols: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for _, row, col in ranked:
        if row not in used_rows and col not in used_cols:
            used_rows.add(row)
            used_cols.add(col)
            pairs.append((row, col))
    return pairs


def refine(
    text: str,
    mentions: Sequence[Mention],
    gt_boxes: npt.ArrayLike,
    fmt: CoordinateFormat,
    frame_w: float,
    frame_h: float,
    crop: Box | None = None,
    iou_threshold: float = REFINE_IOU_THRESHOLD,
) -> RefineResult:
    """Replace each box matching a GT box with IoU > 0.5 (one-to-one, greedy by IoU) by that GT box.

    ``mentions`` are ``parse(text, fmt, frame_w, frame_h).mentions`` (boxes in the model's frame);
    ``gt_boxes`` (n, 4) are full-image pixels and IoU is measured there. The GT box is written back in
    the native format of the frame the model saw (the ``crop`` shown as ``frame_w x frame_h``;
    ``None`` = the full image), clipped to that frame. The rest of the text is unchanged.
    """
    return refine_candidates([(text, mentions)], gt_boxes, fmt, frame_w, frame_h, crop, iou_threshold)[0]


def refine_candidates(
    candidates: Sequence[tuple[str, Sequence[Mention]]],
    gt_boxes: npt.ArrayLike,
    fmt: CoordinateFormat,
    frame_w: float,
    frame_h: float,
    crop: Box | None = None,
    iou_threshold: float = REFINE_IOU_THRESHOLD,
) -> list[RefineResult]:
    """:func:`refine` for every ``(text, mentions)`` candidate of one region (see :func:`match_to_gt`)."""
    boxed = [refinable(ms) for _, ms in candidates]
    in_image = [
        mention_boxes_in_image([ms[i] for i in rows], crop, frame_w, frame_h)
        for (_, ms), rows in zip(candidates, boxed, strict=True)
    ]
    matches = match_to_gt(in_image, gt_boxes, fmt, frame_w, frame_h, crop, iou_threshold)
    results = []
    for (text, mentions), rows, matched in zip(candidates, boxed, matches, strict=True):
        new_boxes = {rows[row]: replacement.native for row, replacement in matched.items()}
        results.append(RefineResult(*rewrite_mentions(text, mentions, new_boxes, fmt), len(new_boxes)))
    return results


def refinable(mentions: Sequence[Mention]) -> list[int]:
    """Indices of the mentions refinement can rewrite: those with a box and its markup in the text."""
    return [i for i, m in enumerate(mentions) if m.box is not None and m.span is not None]


@dataclass(frozen=True, slots=True)
class Replacement:
    """The GT box that replaces a candidate's box: as the model writes it, and back in image pixels."""

    native: NativeBox  # in the model's frame, clipped to it, on the format's grid
    in_image: tuple[float, float, float, float]  # that written box in full-image pixels


def match_to_gt(
    boxes_in_image: Sequence[FloatArray],
    gt_boxes: npt.ArrayLike,
    fmt: CoordinateFormat,
    frame_w: float,
    frame_h: float,
    crop: Box | None = None,
    iou_threshold: float = REFINE_IOU_THRESHOLD,
) -> list[dict[int, Replacement]]:
    """Which boxes of each candidate refinement replaces, and by what: ``{row: Replacement}`` per
    candidate, rows of its ``(k, 4)`` full-image array (its boxed mentions in order).

    Refined scores need only this; the text itself is rewritten by :func:`rewrite_mentions`.
    """
    region = RegionBoxes(
        own=[boxes.tolist() for boxes in boxes_in_image],
        grounded=[[] for _ in boxes_in_image],
        gt=as_box_array(gt_boxes).tolist(),
        frame=Frame(fmt, crop, frame_w, frame_h),
    )
    return [refined.matches for refined in refine_regions([region], iou_threshold=iou_threshold)[0]]


@dataclass(frozen=True, slots=True)
class Frame:
    """How the model saw a region: its box format and the crop shown as a width x height image
    (``crop`` None: the full image)."""

    fmt: CoordinateFormat
    crop: Box | None
    width: float
    height: float


@dataclass(frozen=True, slots=True)
class RegionBoxes:
    """One region as refinement needs it, every box in full-image pixels ``x1, y1, x2, y2``."""

    own: Sequence[Sequence[Coords]]  # per candidate: the boxes of its boxed mentions, in mention order
    grounded: Sequence[Sequence[Coords]]  # per candidate: the boxes the grounding model found for it
    gt: Sequence[Coords]
    frame: Frame


@dataclass(frozen=True, slots=True)
class RefinedScore:
    """One candidate after refinement: the boxes replaced (as :func:`match_to_gt`) and its new S_loc."""

    matches: dict[int, Replacement]
    s_loc: float


def refine_regions(
    regions: Sequence[RegionBoxes],
    iou_floor: float | None = None,
    iou_threshold: float = REFINE_IOU_THRESHOLD,
) -> list[list[RefinedScore]]:
    """Refine every candidate of every region and score it against its region's GT (SPEC §2).

    P of a refined candidate is its own boxes, those matching a GT box (IoU > ``iou_threshold``,
    one-to-one, greedy by IoU) replaced by that GT box as the model would write it, plus its grounded
    boxes; ``S_loc = (1/n) Σ_g max_p IoU(g, p)``, best IoUs below ``iou_floor`` counted as 0.

    The numeric work of all regions is shared: one IoU array of every box against its region's GT
    (padded to the largest GT count with empty boxes, whose IoU is always 0), vectorised matching with
    Python's greedy order only for the candidates where two boxes compete, and one re-scoring of the
    replaced boxes. Deciding a whole poll of regions at once is what lets one core keep up with the
    stream (``bench/bench_pairs.py``).
    """
    if not regions:
        return []
    stack = _Stack.of(regions)
    ious = box_iou(stack.rows[:, None, :], stack.gt[stack.row_region])  # (rows, largest GT count)
    accepted = _matches(stack, ious, iou_threshold)
    written = _written(stack, regions, accepted)
    if written:
        replaced_rows = np.array(list(written))
        boxes = np.array([replacement.in_image for replacement in written.values()])
        ious[replaced_rows] = box_iou(boxes[:, None, :], stack.gt[stack.row_region[replaced_rows]])
    s_loc = _scores(stack, ious, iou_floor)
    matches: list[dict[int, Replacement]] = [{} for _ in range(len(stack.cand_start))]
    for row, replacement in written.items():
        candidate = int(stack.row_cand[row])
        matches[candidate][row - int(stack.cand_start[candidate])] = replacement
    scored = [RefinedScore(m, s) for m, s in zip(matches, s_loc.tolist(), strict=True)]
    bounds = stack.region_cands.tolist()
    return [scored[bounds[i] : bounds[i + 1]] for i in range(len(regions))]


@dataclass(frozen=True, slots=True)
class _Stack:
    """Every region's boxes as flat arrays: rows = candidates' own boxes then grounded ones, candidate
    after candidate, region after region; GT padded per region."""

    rows: FloatArray  # (rows, 4)
    row_cand: npt.NDArray[np.intp]  # candidate (over all regions) of each row
    row_region: npt.NDArray[np.intp]
    is_own: npt.NDArray[np.bool_]
    cand_start: npt.NDArray[np.intp]  # first row of each candidate
    cand_rows: npt.NDArray[np.intp]  # rows of each candidate (own + grounded)
    cand_own: npt.NDArray[np.intp]  # its own boxes among them (the first ones)
    cand_region: npt.NDArray[np.intp]
    region_cands: npt.NDArray[np.intp]  # candidate bounds: region i has candidates [b[i], b[i + 1])
    gt: FloatArray  # (regions, largest GT count, 4), padded with (0, 0, 0, 0)
    gt_count: npt.NDArray[np.intp]

    @classmethod
    def of(cls, regions: Sequence[RegionBoxes]) -> _Stack:
        rows: list[Coords] = []
        own_counts: list[int] = []
        found_counts: list[int] = []
        for region in regions:
            for own, found in zip(region.own, region.grounded, strict=True):
                rows += own
                rows += found
                own_counts.append(len(own))
                found_counts.append(len(found))
        own_count, found_count = np.array(own_counts, np.intp), np.array(found_counts, np.intp)
        cand_rows = own_count + found_count
        cand_start = np.cumsum(cand_rows) - cand_rows
        row_cand = np.repeat(np.arange(len(cand_rows)), cand_rows)
        cands_per_region = np.array([len(r.own) for r in regions], np.intp)
        cand_region = np.repeat(np.arange(len(regions)), cands_per_region)
        gt_count = np.array([len(r.gt) for r in regions], np.intp)
        gt = np.zeros((len(regions), max(1, int(gt_count.max())), 4))
        for i, region in enumerate(regions):
            if len(region.gt):
                gt[i, : len(region.gt)] = region.gt
        return cls(
            # One flat float iterator: np.array on a list of tuples costs ~1 µs per box.
            rows=np.fromiter(chain.from_iterable(rows), np.float64, 4 * len(rows)).reshape(-1, 4),
            row_cand=row_cand,
            row_region=cand_region[row_cand],
            is_own=(np.arange(len(rows)) - cand_start[row_cand]) < own_count[row_cand],
            cand_start=cand_start,
            cand_rows=cand_rows,
            cand_own=own_count,
            cand_region=cand_region,
            region_cands=np.concatenate(([0], np.cumsum(cands_per_region))),
            gt=gt,
            gt_count=gt_count,
        )


def _matches(stack: _Stack, ious: FloatArray, iou_threshold: float) -> list[tuple[int, int]]:
    """``(row, GT column)`` of every own box refinement replaces, one-to-one within each candidate.

    Greedy by IoU, as :func:`greedy_match`; it only matters where a box passes the threshold with two
    GT boxes or two boxes of one candidate pass it with the same GT box. Every other hit is kept as is.
    """
    hit_rows, hit_cols = np.nonzero((ious > iou_threshold) & stack.is_own[:, None])
    hit_cands = stack.row_cand[hit_rows]
    competing = (np.bincount(hit_rows, minlength=len(stack.rows))[hit_rows] > 1) | _repeated(
        hit_cands * ious.shape[1] + hit_cols
    )
    accepted = list(zip(hit_rows[~competing].tolist(), hit_cols[~competing].tolist(), strict=True))
    for candidate in np.unique(hit_cands[competing]).tolist():
        start = int(stack.cand_start[candidate])
        own = ious[start : start + int(stack.cand_own[candidate])]  # a candidate's own boxes come first
        accepted += [(start + row, col) for row, col in _greedy(own.tolist(), iou_threshold)]
    return accepted


def _repeated(keys: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
    """Whether each key occurs more than once."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    repeated: npt.NDArray[np.bool_] = counts[inverse] > 1
    return repeated


def _written(
    stack: _Stack, regions: Sequence[RegionBoxes], accepted: list[tuple[int, int]]
) -> dict[int, Replacement]:
    """The replacement of each matched row: its GT box as written, converted once per region and GT box.

    A GT box that vanishes on the model's grid (which one matched at IoU > 0.5 should not) replaces
    nothing."""
    if not accepted:
        return {}
    rows, cols = np.array(accepted, dtype=np.intp).T
    _, first, inverse = np.unique(
        stack.row_region[rows] * stack.gt.shape[1] + cols, return_index=True, return_inverse=True
    )
    by_gt = [
        _replacement(Box(*stack.gt[region, col].tolist()), regions[region].frame)
        for region, col in zip(stack.row_region[rows[first]].tolist(), cols[first].tolist(), strict=True)
    ]
    return {
        row: by_gt[key]
        for row, key in zip(rows.tolist(), inverse.tolist(), strict=True)
        if by_gt[key] is not None
    }


def _scores(stack: _Stack, ious: FloatArray, iou_floor: float | None) -> FloatArray:
    """S_loc of every candidate from the IoUs of its rows (0 with no box or no GT)."""
    s_loc = np.zeros(len(stack.cand_start))
    boxed = np.flatnonzero(stack.cand_rows)  # reduceat cannot express an empty segment
    if len(boxed) == 0:
        return s_loc
    best = np.maximum.reduceat(ious, stack.cand_start[boxed], axis=0)  # (boxed candidates, GT)
    if iou_floor is not None:
        best[best < iou_floor] = 0.0
    gt_count = stack.gt_count[stack.cand_region[boxed]]
    s_loc[boxed] = best.sum(axis=1) / np.maximum(gt_count, 1)
    return s_loc


def _replacement(gt: Box, frame: Frame) -> Replacement | None:
    native = _gt_as_written(gt, frame.fmt, frame.crop, frame.width, frame.height)
    if native is None:
        return None
    return Replacement(native, frame_to_image(native.box, frame.crop, frame.width, frame.height).as_tuple())


def _gt_as_written(
    gt: Box, fmt: CoordinateFormat, crop: Box | None, frame_w: float, frame_h: float
) -> NativeBox | None:
    """The GT box as the model would write it: in its frame, clipped to it, on the format's grid.

    None only when it vanishes there, which a box matched at IoU > 0.5 should not.
    """
    clipped, _ = sanitize_box(*image_to_frame(gt, crop, frame_w, frame_h).as_tuple(), frame_w, frame_h)
    return None if clipped is None else to_native(clipped, fmt, frame_w, frame_h)
