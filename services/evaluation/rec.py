"""REC evaluation: ask a policy for the box of each expression, score Acc@IoU, compare adapters.

Pure functions over predictions (`accuracy_at`, `paired_bootstrap`, `format_table`) plus the glue
that turns a policy into predictions (`predict`), which takes any `Generate` callable, so the same
code scores a model served through `PolicyRunner` (with its adapters) and a model in training.

A prediction is the first box the model writes, parsed by the family's own grammar
(`services.core.formats.parse`) in the frame the model saw and moved to image pixels; text without a
box scores IoU 0, as a wrong answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from PIL import Image

from services.core.boxes import Box, frame_to_image
from services.core.formats import CoordinateFormat, parse
from services.core.scoring import iou_matrix
from services.evaluation.datasets import RecSample
from services.evaluation.prompts import rec_instruction

THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
_CELL = 16  # table column width: fits "[-10.2, +12.5]"

# (images, instructions) -> one greedy answer per pair.
Generate = Callable[[list[Image.Image], list[str]], list[str]]
# (image width, image height) -> the frame the model sees (where absolute-pixel formats live).
FrameOf = Callable[[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Prediction:
    sample_id: str
    text: str
    box: Box | None  # image pixels
    iou: float  # best IoU over the sample's GT boxes; 0 without a box


@dataclass(frozen=True)
class DifferenceCI:
    """Paired bootstrap of accuracy(B) - accuracy(A) at one threshold, in points (0-100)."""

    threshold: float
    difference: float
    low: float
    high: float
    p_not_better: float  # share of resamples where B was not better than A (one-sided)


@dataclass
class AdapterResult:
    name: str
    predictions: list[Prediction] = field(default_factory=list)

    def ious(self) -> npt.NDArray[np.float64]:
        return np.array([p.iou for p in self.predictions], dtype=np.float64)


def best_iou(box: Box | None, truth: Sequence[Box]) -> float:
    if box is None or not truth:
        return 0.0
    return float(iou_matrix([box.as_tuple()], [b.as_tuple() for b in truth]).max())


def read_prediction(
    sample: RecSample, text: str, fmt: CoordinateFormat, frame: tuple[int, int], image_size: tuple[int, int]
) -> Prediction:
    """The first parsed box of `text` (frame pixels) moved to image pixels, and its IoU."""
    frame_w, frame_h = frame
    boxes = parse(text, fmt, frame_w, frame_h).boxes
    box = None
    if boxes:
        whole_image = Box(0.0, 0.0, float(image_size[0]), float(image_size[1]))
        box = frame_to_image(boxes[0], whole_image, frame_w, frame_h)
    return Prediction(sample.sample_id, text, box, best_iou(box, sample.boxes))


def predict(
    samples: Sequence[RecSample],
    generate: Generate,
    fmt: CoordinateFormat,
    frame_of: FrameOf,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> list[Prediction]:
    """Greedy answers to every sample's REC instruction, in batches, read into predictions."""
    predictions: list[Prediction] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        images = [_load_rgb(s.image_path) for s in batch]
        texts = generate(images, [rec_instruction(s.expression, fmt) for s in batch])
        for sample, image, text in zip(batch, images, texts, strict=True):
            predictions.append(read_prediction(sample, text, fmt, frame_of(*image.size), image.size))
        if progress is not None:
            progress(len(predictions), len(samples))
    return predictions


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def accuracy_at(ious: npt.ArrayLike, thresholds: Sequence[float] = THRESHOLDS) -> dict[float, float]:
    """Acc@t in points (0-100): the share of samples whose IoU is at least t."""
    values = np.asarray(ious, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no predictions to score")
    return {t: float((values >= t).mean() * 100.0) for t in thresholds}


def paired_bootstrap(
    ious_a: npt.ArrayLike,
    ious_b: npt.ArrayLike,
    thresholds: Sequence[float] = THRESHOLDS,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[DifferenceCI]:
    """Percentile CIs of Acc(B) - Acc(A) from resampling the same samples for both (paired)."""
    a, b = np.asarray(ious_a, dtype=np.float64), np.asarray(ious_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired IoUs must be two equal, non-empty 1-d arrays, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, a.size, size=(resamples, a.size))
    tail = (1.0 - confidence) / 2.0 * 100.0
    results = []
    for t in thresholds:
        per_sample = (b >= t).astype(np.float64) - (a >= t).astype(np.float64)
        resampled = per_sample[indices].mean(axis=1) * 100.0
        low, high = np.percentile(resampled, [tail, 100.0 - tail])
        results.append(
            DifferenceCI(
                t, float(per_sample.mean() * 100.0), float(low), float(high), float((resampled <= 0).mean())
            )
        )
    return results


def format_table(
    results: Sequence[AdapterResult], thresholds: Sequence[float] = THRESHOLDS, baseline: int = 0
) -> str:
    """Acc@t per adapter, then each later adapter's difference to `results[baseline]` with its 95 % CI."""
    header = f"{'adapter':<28}{'n':>6}" + "".join(f"{'Acc@' + format(t, 'g'):>{_CELL}}" for t in thresholds)
    lines = [header, "-" * len(header)]
    for result in results:
        accuracy = accuracy_at(result.ious(), thresholds)
        lines.append(
            f"{result.name:<28}{len(result.predictions):>6}"
            + "".join(f"{accuracy[t]:>{_CELL}.2f}" for t in thresholds)
        )
    base = results[baseline]
    for i, result in enumerate(results):
        if i == baseline:
            continue
        cis = paired_bootstrap(base.ious(), result.ious(), thresholds)
        cells = "".join(f"{f'{c.difference:+.1f}':>{_CELL}}" for c in cis)
        lines.append(f"{'Δ ' + result.name:<28}{'':>6}{cells}")
        intervals = "".join(f"{f'[{c.low:+.1f}, {c.high:+.1f}]':>{_CELL}}" for c in cis)
        lines.append(f"{'  95% CI':<28}{'':>6}{intervals}")
    return "\n".join(lines)


def chance_iou_of_random_box(samples: Sequence[RecSample], seed: int = 0) -> npt.NDArray[np.float64]:
    """IoUs of a uniformly random box per sample (a floor to compare a policy with)."""
    rng = np.random.default_rng(seed)
    ious = []
    for s in samples:
        w, h = s.width or 1, s.height or 1
        xs, ys = np.sort(rng.uniform(0, w, 2)), np.sort(rng.uniform(0, h, 2))
        ious.append(best_iou(Box(xs[0], ys[0], xs[1], ys[1]), s.boxes))
    return np.array(ious)
