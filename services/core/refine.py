"""Refinement (SPEC §2, "Refinement"): put the GT box in place of every box that nearly found it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
from services.core.scoring import as_box_array, iou_matrix, scores_from_ious

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

    The region's work is shared: one IoU matrix for all candidates' boxes, and each GT box is
    converted to the model's frame and format once however many candidates it replaces a box in.
    Refined scores need only this; the text itself is rewritten by :func:`rewrite_mentions`.
    """
    gt = as_box_array(gt_boxes)
    every_box = np.concatenate(boxes_in_image) if boxes_in_image else np.zeros((0, 4))
    segments, start = [], 0
    for boxes in boxes_in_image:
        segments.append((start, len(boxes)))
        start += len(boxes)
    frame = _Frame(fmt, crop, frame_w, frame_h)
    return _match_segments(iou_matrix(every_box, gt).tolist(), segments, gt, frame, iou_threshold)


@dataclass(frozen=True, slots=True)
class RefinedScore:
    """One candidate after refinement: the boxes replaced (as :func:`match_to_gt`) and its new S_loc."""

    matches: dict[int, Replacement]
    s_loc: float


def refined_localization_scores(
    own: Sequence[Sequence[Coords]],
    grounded: Sequence[Sequence[Coords]],
    gt_boxes: npt.ArrayLike,
    fmt: CoordinateFormat,
    frame_w: float,
    frame_h: float,
    crop: Box | None = None,
    iou_floor: float | None = None,
    iou_threshold: float = REFINE_IOU_THRESHOLD,
) -> list[RefinedScore]:
    """Refine every candidate of one region and score it against the GT (SPEC §2 "Refinement").

    ``own[i]`` are candidate i's boxed mentions and ``grounded[i]`` the boxes the grounding model found
    for its phrases, all full-image pixels. P of the refined candidate is its own boxes, the matched
    ones replaced by their GT box as written, plus the grounded ones. One IoU matrix serves the whole
    region: the matching reads its own rows, the replaced rows are swapped for the IoUs of the written
    GT boxes, and :func:`scores_from_ious` takes the per-candidate maxima.
    """
    gt = as_box_array(gt_boxes)
    rows: list[Coords] = []
    own_segments, counts = [], []
    for mine, found in zip(own, grounded, strict=True):
        own_segments.append((len(rows), len(mine)))
        counts.append(len(mine) + len(found))
        rows += mine
        rows += found
    ious = iou_matrix(rows, gt)
    frame = _Frame(fmt, crop, frame_w, frame_h)
    matches = _match_segments(ious.tolist(), own_segments, gt, frame, iou_threshold)
    replaced = [
        (start + row, replacement.in_image)
        for (start, _), matched in zip(own_segments, matches, strict=True)
        for row, replacement in matched.items()
    ]
    if replaced:
        ious[[row for row, _ in replaced]] = iou_matrix([box for _, box in replaced], gt)
    scores = scores_from_ious(ious.T, counts, iou_floor)
    return [RefinedScore(m, s.s_loc) for m, s in zip(matches, scores, strict=True)]


@dataclass(frozen=True, slots=True)
class _Frame:
    """How the model saw the region: its box format and the crop shown as a frame_w x frame_h image."""

    fmt: CoordinateFormat
    crop: Box | None
    width: float
    height: float


def _match_segments(
    ious: list[list[float]],
    segments: Sequence[tuple[int, int]],
    gt: FloatArray,
    frame: _Frame,
    iou_threshold: float,
) -> list[dict[int, Replacement]]:
    """Greedy matches of each candidate's rows ``(start, count)`` of ``ious`` (rows x GT), with each
    GT box written in the model's format once for the whole region."""
    written: dict[int, Replacement | None] = {}
    matches = []
    for start, count in segments:
        matched: dict[int, Replacement] = {}
        for row, col in _greedy(ious[start : start + count], iou_threshold):
            if col not in written:
                written[col] = _replacement(Box(*gt[col].tolist()), frame)
            replacement = written[col]
            if replacement is not None:
                matched[row] = replacement
        matches.append(matched)
    return matches


def _replacement(gt: Box, frame: _Frame) -> Replacement | None:
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
