"""Localization score and reward (SPEC §2, "Localization score" and "Reward"), vectorised with numpy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.core.boxes import FloatArray

DEFAULT_LAMBDA = 0.8
PRECISION_MATCH_IOU = 0.5
_TINY = float(np.finfo(np.float64).tiny)


def as_box_array(boxes: npt.ArrayLike) -> FloatArray:
    """``(n, 4)`` float64 ``x1, y1, x2, y2`` array; any empty input becomes ``(0, 4)``."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"expected boxes of shape (n, 4), got {array.shape}")
    return array


def iou_matrix(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """``(N, M)`` IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), both ``x1, y1, x2, y2``.

    ``IoU = |a ∩ b| / |a ∪ b|``; a pair whose union has zero area (two degenerate boxes) scores 0.
    """
    a, b = as_box_array(a), as_box_array(b)
    return box_iou(a[:, None, :], b[None, :, :])


def box_iou(a: FloatArray, b: FloatArray) -> FloatArray:
    """IoU of boxes ``a[..., :]`` and ``b[..., :]`` (last axis ``x1, y1, x2, y2``), broadcast as numpy does.

    A pair whose union has zero area (two degenerate boxes) scores 0.
    """
    ax1, ay1, ax2, ay2 = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
    bx1, by1, bx2, by2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    width = np.maximum(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0.0)
    height = np.maximum(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0.0)
    intersection = width * height
    union = _areas(a) + _areas(b) - intersection
    # A zero union (two degenerate boxes) comes with a zero intersection: 0 / tiny = 0, no warning.
    ious: FloatArray = intersection / np.maximum(union, _TINY)
    return ious


def _areas(boxes: FloatArray) -> FloatArray:
    sides = np.maximum(boxes[..., 2:] - boxes[..., :2], 0.0)
    areas: FloatArray = sides[..., 0] * sides[..., 1]
    return areas


@dataclass(frozen=True, slots=True)
class LocalizationResult:
    s_loc: float
    best_iou_per_gt: FloatArray  # max IoU of each GT box over P (after the floor, if any)
    precision: float  # fraction of P matching some GT at IoU >= 0.5; always reported


def localization_score(
    gt: npt.ArrayLike,
    pred: npt.ArrayLike,
    iou_floor: float | None = None,
    precision_weight: float = 0.0,
) -> LocalizationResult:
    """``S_loc = (1/n) Σ_{g∈G} max_{p∈P} IoU(g, p)`` over the n GT boxes G and predicted boxes P.

    * P empty: ``S_loc = 0``. G empty (n = 0): ``S_loc = 0`` as well — a region with nothing to locate
      cannot tell good descriptions from bad ones, so it earns no localization reward.
    * ``iou_floor`` (e.g. 0.5): each best IoU below it counts as 0 (SPEC's optional floor).
    * ``precision_weight`` w: ``S_loc = (1 - w) · recall_term + w · precision`` where recall_term is the
      formula above and precision the fraction of P matching some GT at IoU >= 0.5, which penalises
      boxes matching no GT. w = 0 (the default, as in the paper) leaves the SPEC formula unchanged.
    """
    return localization_scores(gt, [pred], iou_floor, precision_weight)[0]


def localization_scores(
    gt: npt.ArrayLike,
    preds: Sequence[npt.ArrayLike],
    iou_floor: float | None = None,
    precision_weight: float = 0.0,
) -> list[LocalizationResult]:
    """:func:`localization_score` of each candidate of one region, computed for all at once: one IoU
    matrix against the GT, then per-candidate maxima by segment (``reduceat``)."""
    gt = as_box_array(gt)
    arrays = [as_box_array(p) for p in preds]
    rows = np.concatenate(arrays) if arrays else np.zeros((0, 4))
    return scores_from_ious(iou_matrix(gt, rows), [len(a) for a in arrays], iou_floor, precision_weight)


def scores_from_ious(
    ious: FloatArray,
    counts: Sequence[int],
    iou_floor: float | None = None,
    precision_weight: float = 0.0,
) -> list[LocalizationResult]:
    """:func:`localization_scores` from the ``(n GT, N)`` IoU matrix of the GT against every candidate's
    boxes, candidates in consecutive column segments of ``counts`` boxes each.

    For callers that already hold the IoUs (refinement reuses the matrix it matched with)."""
    if not 0.0 <= precision_weight <= 1.0:
        raise ValueError(f"precision_weight must lie in [0, 1], got {precision_weight}")
    counts_array = np.array(counts, dtype=np.intp)
    results = [LocalizationResult(0.0, np.zeros(ious.shape[0]), 0.0) for _ in counts]  # P or G empty
    scored = np.flatnonzero(counts_array)  # reduceat cannot express an empty segment
    if ious.shape[0] == 0 or len(scored) == 0:
        return results
    starts = (np.cumsum(counts_array) - counts_array)[scored]
    best = np.maximum.reduceat(ious, starts, axis=1)  # (n GT, scored candidates)
    if iou_floor is not None:
        best[best < iou_floor] = 0.0
    matched = np.add.reduceat((ious.max(axis=0) >= PRECISION_MATCH_IOU).astype(np.intp), starts)
    precision = matched / counts_array[scored]
    s_loc = (1.0 - precision_weight) * best.mean(axis=0) + precision_weight * precision
    for column, k in enumerate(scored.tolist()):
        results[k] = LocalizationResult(float(s_loc[column]), best[:, column], float(precision[column]))
    return results


def reward(s_sem: float, s_loc: float, lam: float = DEFAULT_LAMBDA) -> float:
    """``S = λ · S_sem + (1 − λ) · S_loc`` (SPEC §2 "Reward", λ = 0.8)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {lam}")
    return lam * s_sem + (1.0 - lam) * s_loc
