"""Box quality of streamed descriptions per adapter version: IoUs, statistics, CIs, table, gauges."""

from __future__ import annotations

import numpy as np
import pytest

from services.evaluation.described_boxes import (
    VersionBoxes,
    bootstrap_difference,
    box_statistics,
    described_box_ious,
    format_box_table,
)
from services.loop.main_job import box_prometheus_text
from spr.v1 import common_pb2, describer_pb2

GT = (0.0, 0.0, 10.0, 10.0)


def _box(x1: float, y1: float, x2: float, y2: float) -> common_pb2.Box:
    return common_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2)


def _record(
    version: str, boxes: list[tuple[float, float, float, float]], gt: bool = True
) -> describer_pb2.DescriptionRecord:
    mentions = [common_pb2.Mention(phrase="x", box=_box(*b), has_box=True) for b in boxes]
    mentions.append(common_pb2.Mention(phrase="no box"))
    region = common_pb2.Region(
        region_id="r", ground_truth=[common_pb2.AnnotatedObject(box=_box(*GT))] if gt else []
    )
    return describer_pb2.DescriptionRecord(
        region=region,
        candidates=[describer_pb2.Candidate(candidate_id="c", mentions=mentions)],
        lineage=common_pb2.Lineage(adapter_version=version),
    )


def test_best_iou_of_every_box_grouped_by_version_and_region() -> None:
    records = [
        _record("", [GT, (0, 0, 10, 5)]),  # IoU 1 and 0.5
        _record("", [(20, 20, 30, 30)], gt=False),  # no GT: left out
        _record("spr-v1-a", [(0, 0, 10, 8)]),  # IoU 0.8
        _record("spr-v1-a", []),  # no boxes: left out
    ]
    base, v1 = described_box_ious(records)
    assert (base.version, v1.version) == ("base", "spr-v1-a")
    assert [r.tolist() for r in base.regions] == [[1.0, 0.5]] and base.boxes == 2
    assert v1.regions[0].tolist() == pytest.approx([0.8])
    mean, at_half, at_seven = box_statistics(base.sums())
    assert (mean, at_half, at_seven) == pytest.approx((0.75, 100.0, 50.0))


def test_difference_ci_resamples_regions_and_covers_the_difference() -> None:
    rng = np.random.default_rng(0)
    worse = VersionBoxes("base", [rng.uniform(0.0, 0.6, 5) for _ in range(60)])
    better = VersionBoxes("v1", [rng.uniform(0.3, 1.0, 5) for _ in range(60)])
    difference, low, high = bootstrap_difference(worse, better)
    assert np.all(low <= difference) and np.all(difference <= high)
    assert low[0] > 0.2 and low[2] > 20.0  # clearly better: mean IoU and the share at 0.7
    same, low, high = bootstrap_difference(worse, worse)
    assert np.allclose(same, 0.0) and np.all(low <= 0.0) and np.all(high >= 0.0)


def test_table_and_gauges_name_every_version() -> None:
    versions = described_box_ious([_record("", [GT]), _record("spr-v1-a", [(0, 0, 10, 5)])])
    table = format_box_table(versions)
    assert "base" in table and "Δ spr-v1-a" in table and "95% CI" in table
    gauges = box_prometheus_text(versions)
    assert 'spr_described_box_iou{adapter="spr-v1-a"} 0.5000' in gauges
    assert 'spr_described_box_share{adapter="base",iou="0.7"} 100.0000' in gauges
    families = [line.split()[2] for line in gauges.splitlines() if line.startswith("# TYPE")]
    assert families == ["spr_described_box_iou", "spr_described_box_share"]
