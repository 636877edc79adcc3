"""Refinement (SPEC §2, "Refinement"): put the GT box in place of every box that nearly found it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.core.boxes import Box, FloatArray, frame_to_image, image_to_frame, sanitize_box
from services.core.formats import (
    CoordinateFormat,
    Mention,
    NativeBox,
    mention_boxes_in_image,
    rewrite_mentions,
    to_native,
)
from services.core.scoring import as_box_array, iou_matrix

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
    # Plain Python: the matrices are small (boxes of one candidate x GT boxes), where numpy's per-call
    # overhead dominates. Sorting (-IoU, flat index) is the row-major tie-break order.
    width = ious.shape[1]
    ranked = sorted(
        (-iou, flat_index) for flat_index, iou in enumerate(ious.ravel().tolist()) if iou > threshold
    )
    used_rows: set[int] = set()
    used_cols: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for _, flat_index in ranked:
        row, col = divmod(flat_index, width)
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
    counts = [len(boxes) for boxes in boxes_in_image]
    every_box = np.concatenate(boxes_in_image) if boxes_in_image else np.zeros((0, 4))
    ious = iou_matrix(every_box, gt)
    written: dict[int, Replacement | None] = {}
    matches, start = [], 0
    for count in counts:
        matched: dict[int, Replacement] = {}
        for row, col in greedy_match(ious[start : start + count], iou_threshold):
            if col not in written:
                written[col] = _replacement(Box(*gt[col].tolist()), fmt, crop, frame_w, frame_h)
            replacement = written[col]
            if replacement is not None:
                matched[row] = replacement
        start += count
        matches.append(matched)
    return matches


def _replacement(
    gt: Box, fmt: CoordinateFormat, crop: Box | None, frame_w: float, frame_h: float
) -> Replacement | None:
    native = _gt_as_written(gt, fmt, crop, frame_w, frame_h)
    if native is None:
        return None
    return Replacement(native, frame_to_image(native.box, crop, frame_w, frame_h).as_tuple())


def _gt_as_written(
    gt: Box, fmt: CoordinateFormat, crop: Box | None, frame_w: float, frame_h: float
) -> NativeBox | None:
    """The GT box as the model would write it: in its frame, clipped to it, on the format's grid.

    None only when it vanishes there, which a box matched at IoU > 0.5 should not.
    """
    clipped, _ = sanitize_box(*image_to_frame(gt, crop, frame_w, frame_h).as_tuple(), frame_w, frame_h)
    return None if clipped is None else to_native(clipped, fmt, frame_w, frame_h)
