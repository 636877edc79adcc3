"""How well the boxes in the policy's own streamed descriptions locate objects, per adapter version.

SPR rewards the boxes a policy writes when it describes a region (``S_loc``, refinement against GT);
REC measures how far that carries over to another task. This measures the first directly: for every
box of every candidate the describer streamed, its best IoU with a GT box of the region (the criterion
refinement matches with), grouped by the adapter version that wrote it. Each round samples new regions,
so versions are compared on different regions: the CI of a difference resamples each version's
regions independently, a region's boxes staying together (cluster bootstrap).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from services.core.scoring import iou_matrix
from spr.v1 import describer_pb2

BOX_THRESHOLDS = (0.5, 0.7)
BASE = "base"
_CELL = 22


@dataclass
class VersionBoxes:
    """The best GT IoU of every described box of one adapter version, kept per region."""

    version: str
    regions: list[npt.NDArray[np.float64]] = field(default_factory=list)

    @property
    def boxes(self) -> int:
        return sum(len(r) for r in self.regions)

    def sums(self, thresholds: Sequence[float] = BOX_THRESHOLDS) -> npt.NDArray[np.float64]:
        """Per region: box count, IoU sum, and the count at or above each threshold."""
        return np.array([[len(r), r.sum(), *((r >= t).sum() for t in thresholds)] for r in self.regions])


def described_box_ious(records: Iterable[describer_pb2.DescriptionRecord]) -> list[VersionBoxes]:
    """Per adapter version (in order of appearance; the base model is ``base``), per region, the best
    IoU with a GT box of each box its candidates gave. Regions without GT or without boxes are left out."""
    versions: dict[str, VersionBoxes] = {}
    for record in records:
        gt = [_coords(o.box) for o in record.region.ground_truth]
        boxes = [_coords(m.box) for c in record.candidates for m in c.mentions if m.has_box]
        if not gt or not boxes:
            continue
        version = record.lineage.adapter_version or BASE
        best = iou_matrix(boxes, gt).max(axis=1)
        versions.setdefault(version, VersionBoxes(version)).regions.append(best)
    return list(versions.values())


def _coords(box: object) -> tuple[float, float, float, float]:
    return (box.x1, box.y1, box.x2, box.y2)  # type: ignore[attr-defined]


def box_statistics(sums: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Mean IoU and the percent of boxes at or above each threshold, from :meth:`VersionBoxes.sums`
    rows (the last axis); any leading axes (bootstrap resamples) are kept."""
    totals = sums.sum(axis=-2)
    count = np.maximum(totals[..., :1], 1.0)
    stats: npt.NDArray[np.float64] = np.concatenate(
        (totals[..., 1:2] / count, 100.0 * totals[..., 2:] / count), axis=-1
    )
    return stats


def bootstrap_difference(
    a: VersionBoxes, b: VersionBoxes, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Statistics of ``b`` minus those of ``a``, with percentile CIs from resampling each one's regions."""
    rng = np.random.default_rng(seed)
    sums_a, sums_b = a.sums(), b.sums()
    draws_a = sums_a[rng.integers(0, len(sums_a), size=(resamples, len(sums_a)))]
    draws_b = sums_b[rng.integers(0, len(sums_b), size=(resamples, len(sums_b)))]
    differences = box_statistics(draws_b) - box_statistics(draws_a)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(differences, [tail, 100.0 - tail], axis=0)
    return box_statistics(sums_b) - box_statistics(sums_a), low, high


def format_box_table(versions: Sequence[VersionBoxes]) -> str:
    """Regions, boxes, mean best IoU and the share of boxes at each threshold per version, then each
    later version's difference to the first with its 95 % CI."""
    columns = ["mean IoU", *(f"% IoU>={t:g}" for t in BOX_THRESHOLDS)]
    header = f"{'described boxes of':<28}{'regions':>8}{'boxes':>7}" + "".join(
        f"{c:>{_CELL}}" for c in columns
    )
    lines = [header, "-" * len(header)]
    for v in versions:
        stats = box_statistics(v.sums())
        cells = f"{stats[0]:>{_CELL}.3f}" + "".join(f"{s:>{_CELL}.1f}" for s in stats[1:])
        lines.append(f"{v.version:<28}{len(v.regions):>8}{v.boxes:>7}{cells}")
    for v in versions[1:]:
        difference, low, high = bootstrap_difference(versions[0], v)
        cells = "".join(f"{_signed(d, i):>{_CELL}}" for i, d in enumerate(difference))
        lines.append(f"{'Δ ' + v.version:<28}{'':>15}{cells}")
        intervals = "".join(
            f"{f'[{_signed(lo, i)}, {_signed(hi, i)}]':>{_CELL}}"
            for i, (lo, hi) in enumerate(zip(low, high, strict=True))
        )
        lines.append(f"{'  95% CI (regions resampled)':<28}{'':>15}{intervals}")
    return "\n".join(lines)


def _signed(value: float, column: int) -> str:
    return f"{value:+.3f}" if column == 0 else f"{value:+.1f}"
