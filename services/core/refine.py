"""Refinement (SPEC §2, "Refinement"): put the GT box in place of every box that nearly found it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    to_native_grid,
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

    :func:`refine_batch` does the work; this spells its result out candidate by candidate.
    """
    boxes = BoxBatch()
    for region in regions:
        boxes.add(region)
    batch = refine_batch(boxes, iou_floor, iou_threshold)
    scored = [RefinedScore(batch.matches(c), s) for c, s in enumerate(batch.s_loc)]
    bounds = batch.region_cands
    return [scored[bounds[i] : bounds[i + 1]] for i in range(len(regions))]


@dataclass(slots=True)
class BoxBatch:
    """The :class:`RegionBoxes` of many regions as :func:`refine_batch` takes them: flat lists of plain
    floats, which cost neither a tuple per box nor the garbage collector's time."""

    rows: list[float] = field(default_factory=list)  # x1, y1, x2, y2 of every box: region after
    # region, candidate after candidate, its own boxes (in mention order) then its grounded ones
    own_counts: list[int] = field(default_factory=list)  # per candidate
    found_counts: list[int] = field(default_factory=list)  # per candidate
    candidates: list[int] = field(default_factory=list)  # per region
    gt: list[float] = field(default_factory=list)  # x1, y1, x2, y2 of every region's GT boxes
    gt_counts: list[int] = field(default_factory=list)  # per region
    frames: list[Frame] = field(default_factory=list)  # per region

    def add(self, region: RegionBoxes) -> None:
        """Append one region."""
        for own, found in zip(region.own, region.grounded, strict=True):
            for box in own:
                self.rows += box
            for box in found:
                self.rows += box
            self.own_counts.append(len(own))
            self.found_counts.append(len(found))
        self.candidates.append(len(region.own))
        for box in region.gt:
            self.gt += box
        self.gt_counts.append(len(region.gt))
        self.frames.append(region.frame)


@dataclass(frozen=True, slots=True)
class RefinedBatch:
    """:func:`refine_batch`'s result: candidates numbered over all regions, region after region."""

    s_loc: list[float]  # each candidate's S_loc after refinement
    region_cands: list[int]  # region i has candidates [region_cands[i], region_cands[i + 1])
    _stack: _Stack
    _written: _Written

    def matches(self, candidate: int) -> dict[int, Replacement]:
        """The candidate's replaced boxes, as :attr:`RefinedScore.matches`."""
        start = int(self._stack.cand_start[candidate])
        return self._written.of_rows(start, start + int(self._stack.cand_own[candidate]))


def refine_batch(
    boxes: BoxBatch,
    iou_floor: float | None = None,
    iou_threshold: float = REFINE_IOU_THRESHOLD,
) -> RefinedBatch:
    """:func:`refine_regions` as flat per-candidate results, replacements built only when asked for.

    The numeric work of all regions is shared: one IoU array of every box against its region's GT
    (padded to the largest GT count with empty boxes, whose IoU is always 0), vectorised matching with
    Python's greedy order only for the candidates where two boxes compete, the matched GT boxes written
    on the formats' grids at once, and one re-scoring of the replaced boxes. Deciding a whole poll of
    regions at once is what lets one core keep up with the stream (``bench/bench_pairs.py``).
    """
    stack = _Stack.of(boxes)
    if not boxes.frames:
        return RefinedBatch([], [0], stack, _Written.none())
    ious = box_iou(stack.rows[:, None, :], stack.gt[stack.row_region])  # (rows, largest GT count)
    written = _written(stack, boxes.frames, _matches(stack, ious, iou_threshold))
    if len(written.rows):
        replaced = written.rows
        in_image = written.in_image[written.row_keys]
        ious[replaced] = box_iou(in_image[:, None, :], stack.gt[stack.row_region[replaced]])
    s_loc = _scores(stack, ious, iou_floor)
    return RefinedBatch(s_loc.tolist(), stack.region_cands.tolist(), stack, written)


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
    def of(cls, boxes: BoxBatch) -> _Stack:
        regions = len(boxes.frames)
        own_count = np.array(boxes.own_counts, np.intp)
        cand_rows = own_count + np.array(boxes.found_counts, np.intp)
        cand_start = np.cumsum(cand_rows) - cand_rows
        row_cand = np.repeat(np.arange(len(cand_rows)), cand_rows)
        cands_per_region = np.array(boxes.candidates, np.intp)
        cand_region = np.repeat(np.arange(regions), cands_per_region)
        gt_count = np.array(boxes.gt_counts, np.intp)
        gt = np.zeros((regions, max(1, int(gt_count.max(initial=0))), 4))
        # Region i's GT boxes go to gt[i, :gt_count[i]]: its k-th box of all is column k - (its first).
        gt_region = np.repeat(np.arange(regions), gt_count)
        gt_column = np.arange(len(gt_region)) - (np.cumsum(gt_count) - gt_count)[gt_region]
        gt[gt_region, gt_column] = np.array(boxes.gt, np.float64).reshape(-1, 4)
        rows = np.array(boxes.rows, np.float64).reshape(-1, 4)
        return cls(
            rows=rows,
            row_cand=row_cand,
            row_region=cand_region[row_cand],
            is_own=(np.arange(len(rows)) - cand_start[row_cand]) < own_count[row_cand],
            cand_start=cand_start,
            cand_rows=cand_rows,
            cand_own=own_count,
            cand_region=cand_region,
            region_cands=np.concatenate(([0], np.cumsum(cands_per_region))).astype(np.intp),
            gt=gt,
            gt_count=gt_count,
        )


def _matches(
    stack: _Stack, ious: FloatArray, iou_threshold: float
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Rows and GT columns of every own box refinement replaces, one-to-one within each candidate.

    Greedy by IoU, as :func:`greedy_match`; it only matters where a box passes the threshold with two
    GT boxes or two boxes of one candidate pass it with the same GT box. Every other hit is kept as is.
    """
    hit_rows, hit_cols = np.nonzero((ious > iou_threshold) & stack.is_own[:, None])
    hit_cands = stack.row_cand[hit_rows]
    competing = (np.bincount(hit_rows, minlength=len(stack.rows))[hit_rows] > 1) | _repeated(
        hit_cands * ious.shape[1] + hit_cols
    )
    rows: list[int] = []
    cols: list[int] = []
    for candidate in np.unique(hit_cands[competing]).tolist():
        start = int(stack.cand_start[candidate])
        own = ious[start : start + int(stack.cand_own[candidate])]  # a candidate's own boxes come first
        for row, col in _greedy(own.tolist(), iou_threshold):
            rows.append(start + row)
            cols.append(col)
    return (
        np.concatenate((hit_rows[~competing], np.array(rows, np.intp))),
        np.concatenate((hit_cols[~competing], np.array(cols, np.intp))),
    )


def _repeated(keys: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
    """Whether each key occurs more than once."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    repeated: npt.NDArray[np.bool_] = counts[inverse] > 1
    return repeated


class _Written:
    """The replacement of every matched row, one per distinct (region, GT box): its box in full-image
    pixels for scoring, and the :class:`Replacement` itself built when first asked for."""

    def __init__(
        self,
        rows: npt.NDArray[np.intp],
        row_keys: npt.NDArray[np.intp],
        in_image: FloatArray,
        replacement: Callable[[int], Replacement],
    ) -> None:
        self.rows = rows  # the replaced rows (a GT box that vanishes on the grid replaces nothing)
        self.row_keys = row_keys  # each one's (region, GT box) key
        self.in_image = in_image  # (keys, 4)
        self._replacement = replacement
        self._by_row: dict[int, int] | None = None
        self._built: dict[int, Replacement] = {}

    @classmethod
    def none(cls) -> _Written:
        def nothing(key: int) -> Replacement:
            raise KeyError(key)

        return cls(np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros((0, 4)), nothing)

    def of_rows(self, start: int, stop: int) -> dict[int, Replacement]:
        """``{row - start: replacement}`` of the replaced rows in ``[start, stop)``."""
        if self._by_row is None:
            self._by_row = dict(zip(self.rows.tolist(), self.row_keys.tolist(), strict=True))
        found = {}
        for row in range(start, stop):
            key = self._by_row.get(row)
            if key is not None:
                built = self._built.get(key)
                if built is None:
                    built = self._built[key] = self._replacement(key)
                found[row - start] = built
        return found


def _written(
    stack: _Stack, frames: Sequence[Frame], matched: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]
) -> _Written:
    """The replacements of the matched rows (and GT columns): each matched GT box written as the model
    would write it, once per region and GT box, vectorised where the format allows (:func:`_gt_written`)."""
    rows, cols = matched
    if not len(rows):
        return _Written.none()
    _, first, inverse = np.unique(
        stack.row_region[rows] * stack.gt.shape[1] + cols, return_index=True, return_inverse=True
    )
    key_region = stack.row_region[rows[first]]
    written = _gt_written(stack.gt[key_region, cols[first]], frames, key_region)
    kept = written.valid[inverse]
    return _Written(rows[kept], inverse[kept], written.in_image, written.replacement)


@dataclass(frozen=True, slots=True)
class _GtWritten:
    """GT boxes written in their regions' frames: valid (False: vanished on the grid), the box in image
    pixels, and a builder of the :class:`Replacement` of a valid one."""

    valid: npt.NDArray[np.bool_]
    in_image: FloatArray
    replacement: Callable[[int], Replacement]


def _gt_written(gt: FloatArray, frames: Sequence[Frame], frame_of: npt.NDArray[np.intp]) -> _GtWritten:
    """:func:`_replacement` of each GT box (rows of ``gt``, full-image pixels) in its frame
    (``frames[frame_of[i]]``), computed with numpy for the boxes that take its common path (inside the
    frame, a format with integer numbers), bit for bit as the scalar path; the others go through
    :func:`_replacement` itself."""
    count = len(gt)
    sizes = np.array([(f.width, f.height) for f in frames], np.float64).reshape(-1, 2)[frame_of]
    sizes = np.tile(sizes, 2)  # width, height, width, height
    crops = np.array([(0.0, 0.0, 1.0, 1.0) if f.crop is None else f.crop.as_tuple() for f in frames])
    crops = crops.reshape(-1, 4)[frame_of]
    has_crop = np.array([f.crop is not None for f in frames], np.bool_)[frame_of]
    fmts = [f.fmt for f in frames]
    fmt_of = np.array([fmts.index(f) for f in fmts], np.intp)[frame_of]  # first frame of its format
    valid = np.zeros(count, np.bool_)
    in_image = np.zeros((count, 4))
    numbers = np.zeros((count, 4))
    read_back = np.zeros((count, 4))
    fast = np.zeros(count, np.bool_)
    for first in np.unique(fmt_of).tolist():
        members = fmt_of == first
        grid = _grid_rows(gt[members], sizes[members], crops[members], has_crop[members], fmts[first])
        if grid is not None:
            fast[members], in_image[members], numbers[members], read_back[members] = grid
    valid[fast] = True
    scalar: dict[int, Replacement | None] = {}
    for i in np.flatnonzero(~fast).tolist():
        slow = scalar[i] = _replacement(Box(*gt[i].tolist()), frames[int(frame_of[i])])
        if slow is not None:
            valid[i] = True
            in_image[i] = slow.in_image
    as_lists: list[list[list[float]]] = []  # numbers, read_back, in_image as lists, made once

    def replacement(key: int) -> Replacement:
        if key in scalar:
            found = scalar[key]
            assert found is not None  # only valid keys are asked for
            return found
        if not as_lists:
            as_lists.extend((numbers.tolist(), read_back.tolist(), in_image.tolist()))
        x1, y1, x2, y2 = as_lists[0][key]
        written = (str(int(x1)), str(int(y1)), str(int(x2)), str(int(y2)))
        box = Box(*as_lists[1][key])
        return Replacement(NativeBox(written, box), tuple(as_lists[2][key]))  # type: ignore[arg-type]

    return _GtWritten(valid, in_image, replacement)


def _grid_rows(
    gt: FloatArray,
    sizes: FloatArray,
    crops: FloatArray,
    has_crop: npt.NDArray[np.bool_],
    fmt: CoordinateFormat,
) -> tuple[npt.NDArray[np.bool_], FloatArray, FloatArray, FloatArray] | None:
    """The vectorised :func:`_gt_as_written` + ``frame_to_image`` of GT boxes of one format (each row
    with its frame's width, height, width, height and its crop): which rows took the common path (the
    others must take the scalar one), their boxes in image pixels, their numbers and their boxes read
    back in the frame. None when the format has no vectorised form."""
    origin = np.tile(crops[:, :2], 2)
    crop_sizes = np.tile(crops[:, 2:] - crops[:, :2], 2)  # crop.width, crop.height (x2 - x1, y2 - y1)
    with np.errstate(all="ignore"):  # rows with unusable numbers take the scalar path, which says why
        # image_to_frame: (v - crop.x1) * (frame_w / crop.width)
        in_frame = np.where(has_crop[:, None], (gt - origin) * (sizes / crop_sizes), gt)
        grid = to_native_grid(in_frame, fmt, sizes)
        if grid is None:
            return None
        numbers, read_back = grid
        # frame_to_image: crop.x1 + v * (crop.width / frame_w)
        in_image = np.where(has_crop[:, None], origin + read_back * (crop_sizes / sizes), read_back)
        fast = (
            (crop_sizes > 0).all(axis=1)
            & (sizes > 0).all(axis=1)
            & _kept_as_is(in_frame, sizes)  # sanitize_box's common case, before writing
            & _kept_as_is(read_back, sizes)  # and after reading back
        )
    return fast, in_image, numbers, read_back


def _kept_as_is(boxes: FloatArray, sizes: FloatArray) -> npt.NDArray[np.bool_]:
    """Rows :func:`sanitize_box` returns unchanged: ``0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h``."""
    x1, y1, x2, y2 = boxes.T
    kept: npt.NDArray[np.bool_] = (
        (x1 >= 0.0) & (x1 < x2) & (x2 <= sizes[:, 0]) & (y1 >= 0.0) & (y1 < y2) & (y2 <= sizes[:, 1])
    )
    return kept


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
