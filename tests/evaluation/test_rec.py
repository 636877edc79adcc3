"""REC metrics on hand-built predictions, the paired bootstrap on known data, the table and the plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.core.boxes import Box
from services.core.formats import CoordinateFormat
from services.evaluation.datasets import RecSample
from services.evaluation.plot import PALETTE, plot_accuracy
from services.evaluation.rec import (
    AdapterResult,
    Prediction,
    accuracy_at,
    best_iou,
    format_table,
    paired_bootstrap,
    predict,
    read_prediction,
)


def test_accuracy_counts_iou_at_or_above_each_threshold_exactly() -> None:
    ious = [0.5, 0.59, 0.6, 0.95, 0.0, 0.8, 0.7, 0.89, 0.9, 0.1]
    assert accuracy_at(ious) == {0.5: 80.0, 0.6: 60.0, 0.7: 50.0, 0.8: 40.0, 0.9: 20.0}
    assert accuracy_at([1.0], (0.5, 1.0)) == {0.5: 100.0, 1.0: 100.0}
    with pytest.raises(ValueError):
        accuracy_at([])


def test_best_iou_takes_any_ground_truth_box() -> None:
    truth = [Box(0, 0, 10, 10), Box(20, 20, 30, 30)]
    assert best_iou(Box(20, 20, 30, 30), truth) == 1.0
    assert best_iou(Box(0, 0, 10, 5), truth) == 0.5
    assert best_iou(None, truth) == 0.0


SAMPLE = RecSample("s", "unused.png", "the red circle", (Box(24, 24, 72, 48),), 96, 96)


@pytest.mark.parametrize(
    ("fmt", "text", "frame", "iou"),
    [
        (CoordinateFormat.BRACKET_999, "[250, 250, 749, 500]", (96, 96), 1.0),  # 24/96*999 = 249.75
        (CoordinateFormat.BRACKET_999, "the red circle [250, 250, 749, 500].", (336, 336), 1.0),
        (CoordinateFormat.BRACKET_FLOAT, "[0.25, 0.25, 0.5, 0.5]", (96, 96), 0.5),
        (CoordinateFormat.QWEN2_TOKENS, "<|box_start|>(250,250),(750,500)<|box_end|>", (112, 112), 1.0),
        # absolute pixels of a 192 x 192 frame: halved back to the 96 px image
        (CoordinateFormat.QWEN25_JSON, '[{"bbox_2d": [48, 48, 144, 96], "label": "x"}]', (192, 192), 1.0),
        (CoordinateFormat.BRACKET_999, "I cannot see it.", (96, 96), 0.0),
    ],
)
def test_read_prediction_parses_each_format_in_its_frame(
    fmt: CoordinateFormat, text: str, frame: tuple[int, int], iou: float
) -> None:
    prediction = read_prediction(SAMPLE, text, fmt, frame, (96, 96))
    assert prediction.iou == pytest.approx(iou, abs=0.01)
    assert (prediction.box is None) == (iou == 0.0)


def test_predict_batches_and_keeps_order(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (96, 96)).save(path)
    samples = [
        RecSample(str(i), str(path), f"object {i}", (Box(0, 0, 48 + i, 48),), 96, 96) for i in range(5)
    ]
    calls: list[int] = []

    def generate(images: list[Image.Image], instructions: list[str]) -> list[str]:
        """Answers with the box of the object number named in each instruction (a perfect oracle)."""
        calls.append(len(images))
        numbers = [int(text.split("object ")[1].split("?")[0]) for text in instructions]
        return [f"[0, 0, {round((48 + n) * 999 / 96)}, 500]" for n in numbers]

    predictions = predict(samples, generate, CoordinateFormat.BRACKET_999, lambda w, h: (w, h), batch_size=2)
    assert calls == [2, 2, 1]
    assert [p.sample_id for p in predictions] == ["0", "1", "2", "3", "4"]
    assert all(p.iou > 0.97 for p in predictions)


def test_paired_bootstrap_on_known_differences() -> None:
    n = 1000
    a = np.zeros(n)
    same = paired_bootstrap(a, a, resamples=500)
    assert all(c.difference == c.low == c.high == 0.0 for c in same)
    better = paired_bootstrap(a, np.ones(n), resamples=500)
    assert all(c.difference == c.low == c.high == 100.0 and c.p_not_better == 0.0 for c in better)
    half = np.where(np.arange(n) % 2 == 0, 0.95, 0.0)  # B right on every other sample, A never
    (ci,) = paired_bootstrap(a, half, thresholds=(0.5,), resamples=4000, seed=1)
    expected_half_width = 1.96 * math.sqrt(0.25 / n) * 100  # binomial standard error of 50 %
    assert ci.difference == 50.0
    assert ci.low == pytest.approx(50 - expected_half_width, abs=0.8)
    assert ci.high == pytest.approx(50 + expected_half_width, abs=0.8)


def test_paired_bootstrap_sees_what_unpaired_would_miss() -> None:
    """A and B agree on most samples; B fixes 40 of 1000: paired CI excludes 0 although the
    accuracies (about 50 %) have unpaired CIs of about +-3 points each."""
    rng = np.random.default_rng(0)
    a = (rng.random(1000) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:40]] = 1.0
    (ci,) = paired_bootstrap(a, b, thresholds=(0.5,))
    assert ci.difference == pytest.approx(4.0) and ci.low > 2.0 and ci.p_not_better == 0.0


def test_paired_bootstrap_refuses_unpaired_input() -> None:
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap([0.1, 0.2], [0.3])


def _result(name: str, ious: list[float]) -> AdapterResult:
    return AdapterResult(name, [Prediction(str(i), "", None, v) for i, v in enumerate(ious)])


def test_table_lists_every_adapter_and_its_difference_to_base() -> None:
    base = _result("base", [0.0, 0.55, 0.65, 0.95])
    round1 = _result("spr-v1", [0.55, 0.55, 0.75, 0.95])
    table = format_table([base, round1])
    lines = table.splitlines()
    assert lines[0].split() == ["adapter", "n", "Acc@0.5", "Acc@0.6", "Acc@0.7", "Acc@0.8", "Acc@0.9"]
    assert lines[2].split() == ["base", "4", "75.00", "50.00", "25.00", "25.00", "25.00"]
    assert lines[3].split() == ["spr-v1", "4", "100.00", "50.00", "50.00", "25.00", "25.00"]
    assert lines[4].split() == ["Δ", "spr-v1", "+25.0", "+0.0", "+25.0", "+0.0", "+0.0"]
    assert "95% CI" in lines[5]


def test_plot_draws_one_coloured_line_per_adapter(tmp_path: Path) -> None:
    curves = {"base": accuracy_at([0.5, 0.7, 0.9, 0.2]), "spr-v1": accuracy_at([0.6, 0.8, 0.95, 0.55])}
    path = plot_accuracy(curves, tmp_path / "plot.png")
    with Image.open(path) as image:
        colours = {c for _, c in image.convert("RGB").getcolors(1 << 20) or []}
        assert image.size == (720, 460)
    assert PALETTE[0] in colours and PALETTE[1] in colours and PALETTE[2] not in colours
    with pytest.raises(ValueError):
        plot_accuracy({}, tmp_path / "empty.png")
