from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pycocotools import mask as coco_mask

from services.core import (
    Box,
    FloatArray,
    boxes_to_array,
    iou_matrix,
    localization_score,
    localization_scores,
    reward,
)

from .strategies import FAST, THOROUGH, boxes_in

image_boxes = st.lists(boxes_in(1000, 800), max_size=12).map(boxes_to_array)
positive_boxes = st.lists(boxes_in(1000, 800, min_side=0.5), min_size=1, max_size=12).map(boxes_to_array)


def test_iou_examples() -> None:
    a = [[0, 0, 10, 10], [0, 0, 10, 10]]
    b = [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [3, 3, 3, 9]]
    assert iou_matrix(a, b).tolist() == [[1.0, 50 / 150, 0.0, 0.0]] * 2


def test_iou_shapes_and_degenerate_boxes() -> None:
    assert iou_matrix(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)
    assert iou_matrix([[0, 0, 1, 1]], []).shape == (1, 0)
    assert iou_matrix([[2, 2, 2, 2]], [[2, 2, 2, 2]]).tolist() == [[0.0]]  # empty union scores 0
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        iou_matrix([[0, 0, 1]], [[0, 0, 1, 1]])


@THOROUGH
@given(image_boxes, image_boxes)
def test_iou_is_symmetric_and_bounded(a: FloatArray, b: FloatArray) -> None:
    ious = iou_matrix(a, b)
    assert ious.shape == (len(a), len(b)) and ious.dtype == np.float64
    assert np.all((ious >= 0.0) & (ious <= 1.0))
    np.testing.assert_array_equal(ious, iou_matrix(b, a).T)


@FAST
@given(positive_boxes)
def test_iou_of_a_box_with_itself_is_one(a: FloatArray) -> None:
    np.testing.assert_allclose(np.diag(iou_matrix(a, a)), 1.0, rtol=0, atol=1e-12)


def _xywh(boxes: FloatArray) -> FloatArray:
    return np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])


@THOROUGH
@given(positive_boxes, positive_boxes)
def test_iou_agrees_with_pycocotools(a: FloatArray, b: FloatArray) -> None:
    expected = coco_mask.iou(_xywh(a), _xywh(b), np.zeros(len(b), dtype=np.uint8))
    np.testing.assert_allclose(iou_matrix(a, b), expected, rtol=0, atol=1e-9)


def test_localization_score_examples() -> None:
    gt = [[0, 0, 10, 10], [20, 0, 30, 10]]
    perfect = localization_score(gt, gt)
    assert perfect.s_loc == 1.0 and perfect.precision == 1.0
    half = localization_score(gt, [[0, 0, 10, 10]])
    assert half.s_loc == 0.5 and half.best_iou_per_gt.tolist() == [1.0, 0.0]
    assert localization_score(gt, []).s_loc == 0.0  # P empty
    assert localization_score([], [[0, 0, 1, 1]]).s_loc == 0.0  # n = 0 (documented choice)


def test_localization_score_floor_and_precision_options() -> None:
    gt = [[0, 0, 10, 10], [20, 0, 30, 10]]
    pred = [[0, 0, 10, 10], [20, 0, 26, 10], [50, 50, 60, 60]]  # IoUs 1.0 and 0.6, plus a stray box
    assert localization_score(gt, pred).s_loc == pytest.approx(0.8)
    assert localization_score(gt, pred, iou_floor=0.7).s_loc == pytest.approx(0.5)
    result = localization_score(gt, pred, precision_weight=0.5)
    assert result.precision == pytest.approx(2 / 3)
    assert result.s_loc == pytest.approx(0.5 * 0.8 + 0.5 * 2 / 3)
    with pytest.raises(ValueError, match="precision_weight"):
        localization_score(gt, pred, precision_weight=1.5)


@THOROUGH
@given(
    positive_boxes,
    image_boxes,
    st.data(),
    st.sampled_from([None, 0.5]),
    st.sampled_from([0.0, 0.3, 1.0]),
)
def test_s_loc_is_bounded_and_never_drops_when_an_exact_gt_box_is_added(
    gt: FloatArray, pred: FloatArray, data: st.DataObject, floor: float | None, weight: float
) -> None:
    before = localization_score(gt, pred, iou_floor=floor, precision_weight=weight)
    assert 0.0 <= before.s_loc <= 1.0
    exact = gt[data.draw(st.integers(0, len(gt) - 1))]
    after = localization_score(gt, np.vstack([pred, exact]), iou_floor=floor, precision_weight=weight)
    assert after.s_loc >= before.s_loc - 1e-12


def test_reward_is_the_spec_mix() -> None:
    assert reward(1.0, 0.0) == pytest.approx(0.8)
    assert reward(0.5, 1.0, lam=0.5) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="lambda"):
        reward(0.5, 0.5, lam=1.2)


def test_boxes_to_array_feeds_scoring() -> None:
    gt = boxes_to_array([Box(0, 0, 10, 10)])
    assert localization_score(gt, boxes_to_array([Box(0, 0, 10, 10)])).s_loc == 1.0


def reference_s_loc(gt: FloatArray, pred: FloatArray, floor: float | None, weight: float) -> float:
    """The SPEC formula, one candidate at a time, straight from the IoU matrix."""
    if len(gt) == 0 or len(pred) == 0:
        return 0.0
    ious = iou_matrix(gt, pred)
    best = ious.max(axis=1)
    if floor is not None:
        best = np.where(best < floor, 0.0, best)
    precision = float(np.mean(ious.max(axis=0) >= 0.5))
    return (1 - weight) * float(best.mean()) + weight * precision


@FAST
@given(
    image_boxes,
    st.lists(image_boxes, max_size=6),
    st.sampled_from([None, 0.5]),
    st.sampled_from([0.0, 0.25]),
)
def test_batched_scores_equal_one_candidate_at_a_time(
    gt: FloatArray, preds: list[FloatArray], floor: float | None, weight: float
) -> None:
    batch = localization_scores(gt, preds, iou_floor=floor, precision_weight=weight)
    assert len(batch) == len(preds)
    for result, pred in zip(batch, preds, strict=True):
        assert result.s_loc == pytest.approx(reference_s_loc(gt, pred, floor, weight), abs=1e-12)
        assert result.best_iou_per_gt.shape == (len(gt),)
