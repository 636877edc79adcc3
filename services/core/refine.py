"""Refinement (SPEC §2, "Refinement"): put the GT box in place of every box that nearly found it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy.typing as npt

from services.core.boxes import Box, FloatArray, image_to_frame, sanitize_box
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
    """:func:`refine` for every ``(text, mentions)`` candidate of one region.

    The region's work is shared: one IoU matrix for all candidates' boxes, and each GT box is
    converted to the model's frame and format once however many candidates it replaces a box in.
    """
    gt = as_box_array(gt_boxes)
    boxed = [
        [i for i, m in enumerate(ms) if m.box is not None and m.span is not None] for _, ms in candidates
    ]
    every_box = [ms[i] for (_, ms), rows in zip(candidates, boxed, strict=True) for i in rows]
    ious = iou_matrix(mention_boxes_in_image(every_box, crop, frame_w, frame_h), gt)
    gt_written: dict[int, NativeBox | None] = {}
    results, start = [], 0
    for (text, mentions), rows in zip(candidates, boxed, strict=True):
        end = start + len(rows)
        new_boxes: dict[int, NativeBox] = {}
        for row, col in greedy_match(ious[start:end], iou_threshold):
            if col not in gt_written:
                gt_written[col] = _gt_as_written(Box(*gt[col].tolist()), fmt, crop, frame_w, frame_h)
            native = gt_written[col]
            if native is not None:
                new_boxes[rows[row]] = native
        start = end
        results.append(RefineResult(*rewrite_mentions(text, mentions, new_boxes, fmt), len(new_boxes)))
    return results


def _gt_as_written(
    gt: Box, fmt: CoordinateFormat, crop: Box | None, frame_w: float, frame_h: float
) -> NativeBox | None:
    """The GT box as the model would write it: in its frame, clipped to it, on the format's grid.

    None only when it vanishes there, which a box matched at IoU > 0.5 should not.
    """
    clipped, _ = sanitize_box(*image_to_frame(gt, crop, frame_w, frame_h).as_tuple(), frame_w, frame_h)
    return None if clipped is None else to_native(clipped, fmt, frame_w, frame_h)
