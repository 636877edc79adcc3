"""Benchmark: score, refine and pair one region of 8 candidates x 20 boxes (``python bench/bench_core.py``).

Per region: for each candidate, S_loc of its boxes against the GT, refinement, S_loc of the refined
boxes and both rewards; then ``select_pair``. Descriptions are parsed beforehand (parsing happens in
the describer stage); a separate line times the parse. The baseline does the same work with the
naive pure-Python double-loop IoU / S_loc / matching, measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from services.core import (
    Box,
    CoordinateFormat,
    FloatArray,
    Mention,
    ScoredCandidate,
    frame_to_image,
    localization_scores,
    mention_boxes_in_image,
    parse,
    quantize,
    refine_candidates,
    render,
    replace_boxes,
    reward,
    select_pair,
)

IMAGE_W, IMAGE_H = 1280, 960
CROP = Box(200, 150, 1000, 750)  # the region, shown to the model as an 800 x 600 crop
FRAME_W, FRAME_H = 800, 600
FMT = CoordinateFormat.BRACKET_999
CANDIDATES, BOXES_PER_CANDIDATE, GT_BOXES = 8, 20, 10


def semantic(candidate_index: int) -> float:
    """Stand-in S_sem (another service computes it); refinement leaves it unchanged."""
    return 0.5 + 0.04 * (candidate_index % 4)


def random_box(rng: random.Random, x0: float, y0: float, w: float, h: float) -> Box:
    bw, bh = rng.uniform(0.05, 0.4) * w, rng.uniform(0.05, 0.4) * h
    x, y = x0 + rng.uniform(0, w - bw), y0 + rng.uniform(0, h - bh)
    return Box(x, y, x + bw, y + bh)


def jittered(rng: random.Random, box: Box) -> Box:
    dx, dy = box.width * 0.15, box.height * 0.15
    return Box(*(v + rng.uniform(-d, d) for v, d in zip(box.as_tuple(), (dx, dy, dx, dy), strict=True)))


def make_region(seed: int = 0) -> tuple[list[list[float]], list[tuple[str, list[Mention]]]]:
    """GT boxes (image pixels) and candidates (text, parsed mentions in the crop frame)."""
    rng = random.Random(seed)
    gt = [random_box(rng, CROP.x1, CROP.y1, CROP.width, CROP.height) for _ in range(GT_BOXES)]
    candidates = []
    for _ in range(CANDIDATES):
        mentions = []
        for i in range(BOXES_PER_CANDIDATE):
            # About half the boxes are near a GT box (refinable), the rest anywhere in the frame.
            near = i % 2 == 0
            box = jittered(rng, gt[i % GT_BOXES]) if near else random_box(rng, *CROP.as_tuple()[:2], 800, 600)
            in_frame = Box(box.x1 - CROP.x1, box.y1 - CROP.y1, box.x2 - CROP.x1, box.y2 - CROP.y1)
            mentions.append(Mention(f"object {i}", in_frame.clip(FRAME_W, FRAME_H)))
        text = "The region shows " + render(mentions, FMT, FRAME_W, FRAME_H)
        candidates.append((text, parse(text, FMT, FRAME_W, FRAME_H).mentions))
    return [list(g.as_tuple()) for g in gt], candidates


def image_boxes(mentions: Sequence[Mention]) -> list[Box]:
    return [frame_to_image(m.box, CROP, FRAME_W, FRAME_H) for m in mentions if m.box is not None]


# --- the library ----------------------------------------------------------------------------------


def boxes_per_candidate(mention_lists: Sequence[Sequence[Mention]]) -> list[FloatArray]:
    """Each candidate's boxes in image pixels, from one array conversion for the whole region."""
    every = [m for mentions in mention_lists for m in mentions if m.box is not None]
    counts = [sum(m.box is not None for m in mentions) for mentions in mention_lists]
    return np.split(mention_boxes_in_image(every, CROP, FRAME_W, FRAME_H), np.cumsum(counts)[:-1])


def score_region(gt: list[list[float]], candidates: list[tuple[str, list[Mention]]]) -> object:
    # Region-level calls: every candidate is scored and refined against the same GT at once.
    initial_loc = localization_scores(gt, boxes_per_candidate([mentions for _, mentions in candidates]))
    results = refine_candidates(candidates, gt, FMT, FRAME_W, FRAME_H, crop=CROP)
    refined_loc = localization_scores(gt, boxes_per_candidate([r.mentions for r in results]))
    initial = [
        ScoredCandidate(f"c{i}", text, semantic(i), loc.s_loc, reward(semantic(i), loc.s_loc))
        for i, ((text, _), loc) in enumerate(zip(candidates, initial_loc, strict=True))
    ]
    refined = [
        ScoredCandidate(
            f"r{i}", r.text, semantic(i), loc.s_loc, reward(semantic(i), loc.s_loc), True, r.replaced_count
        )
        for i, (r, loc) in enumerate(zip(results, refined_loc, strict=True))
    ]
    return select_pair(initial, refined)


# --- the naive baseline: the same work with pure-Python double loops -------------------------------


def naive_iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def naive_s_loc(gt: list[list[float]], pred: list[Box]) -> float:
    if not gt or not pred:
        return 0.0
    return sum(max(naive_iou(g, p.as_tuple()) for p in pred) for g in gt) / len(gt)


def naive_refine(text: str, mentions: list[Mention], gt: list[list[float]]) -> tuple[str, list[Box], int]:
    boxed = [(m.span, m.box) for m in mentions if m.box is not None and m.span is not None]
    in_image = [frame_to_image(box, CROP, FRAME_W, FRAME_H).as_tuple() for _, box in boxed]
    pairs = sorted(
        ((naive_iou(p, g), i, j) for i, p in enumerate(in_image) for j, g in enumerate(gt)),
        key=lambda t: -t[0],
    )
    used_p: set[int] = set()
    used_g: set[int] = set()
    replacements, new_boxes = [], {}
    for iou, i, j in pairs:
        if iou <= 0.5:
            break
        if i in used_p or j in used_g:
            continue
        used_p.add(i)
        used_g.add(j)
        g = gt[j]
        frame_box = Box(g[0] - CROP.x1, g[1] - CROP.y1, g[2] - CROP.x1, g[3] - CROP.y1).clip(FRAME_W, FRAME_H)
        replacements.append((boxed[i][0], frame_box))
        new_boxes[i] = quantize(frame_box, FMT, FRAME_W, FRAME_H) or frame_box
    new_text = replace_boxes(text, replacements, FMT, FRAME_W, FRAME_H)
    boxes = [new_boxes.get(i, box) for i, (_, box) in enumerate(boxed)]
    return new_text, [frame_to_image(b, CROP, FRAME_W, FRAME_H) for b in boxes], len(replacements)


def naive_score_region(gt: list[list[float]], candidates: list[tuple[str, list[Mention]]]) -> object:
    initial, refined = [], []
    for index, (text, mentions) in enumerate(candidates):
        s_loc = naive_s_loc(gt, image_boxes(mentions))
        initial.append(
            ScoredCandidate(f"c{index}", text, semantic(index), s_loc, reward(semantic(index), s_loc))
        )
        new_text, boxes, replaced = naive_refine(text, mentions, gt)
        s_loc = naive_s_loc(gt, boxes)
        s_sem = semantic(index)
        refined.append(
            ScoredCandidate(f"r{index}", new_text, s_sem, s_loc, reward(s_sem, s_loc), True, replaced)
        )
    return select_pair(initial, refined)


# --- timing ---------------------------------------------------------------------------------------


def time_us(fn: Callable[[], object], repeats: int) -> list[float]:
    for _ in range(max(repeats // 10, 5)):  # warm caches and numpy's first-call paths
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1000.0)
    return samples


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    gt, candidates = make_region()
    decision = score_region(gt, candidates)
    assert decision == naive_score_region(gt, candidates), "the baseline must reach the same decision"

    ours = time_us(lambda: score_region(gt, candidates), args.repeats)
    naive = time_us(lambda: naive_score_region(gt, candidates), args.repeats)
    texts = [text for text, _ in candidates]
    parsing = time_us(lambda: [parse(t, FMT, FRAME_W, FRAME_H) for t in texts], args.repeats)

    shape = f"{CANDIDATES} candidates x {BOXES_PER_CANDIDATE} boxes, {GT_BOXES} GT boxes"
    print(f"region scoring ({shape}), {args.repeats} runs each; decision: {type(decision).__name__}")
    for name, samples in (("services.core", ours), ("naive baseline", naive)):
        print(f"  {name:16s} median {statistics.median(samples):8.1f} us   p95 {p95(samples):8.1f} us")
    print(f"  baseline / core (median): {statistics.median(naive) / statistics.median(ours):.2f}x")
    print(
        f"parsing the {CANDIDATES} descriptions (not in the above): "
        f"median {statistics.median(parsing):.1f} us   p95 {p95(parsing):.1f} us"
    )


if __name__ == "__main__":
    main()
