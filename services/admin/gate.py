"""The eval gate (SPEC §3, issue 6): a version may take a gated alias such as ``stable`` only if its
eval metrics are not worse than those of the version the alias names now by more than a tolerance.

Pure functions over manifest metrics (``AdapterManifest.metrics``), so the trainer can apply the
same rule before it moves ``stable`` itself. Every gated metric is "higher is better" (preference
accuracy, reward margin on held-out pairs); tolerances are absolute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from services.admin.errors import EvalGateFailed, EvalMetricsMissing


@dataclass(frozen=True)
class MetricCheck:
    """One metric of the candidate against the reference (None: nothing to compare against)."""

    metric: str
    candidate: float
    reference: float | None
    tolerance: float

    @property
    def passed(self) -> bool:
        """Not lower than the reference by more than the tolerance."""
        return self.reference is None or self.candidate >= self.reference - self.tolerance

    def describe(self) -> str:
        """``metric 0.61 vs 0.70 (tolerance 0.01)`` for messages and reasons."""
        if self.reference is None:
            return f"{self.metric} {self.candidate:.4g} (no reference)"
        return f"{self.metric} {self.candidate:.4g} vs {self.reference:.4g} (tolerance {self.tolerance:g})"


@dataclass(frozen=True)
class GateResult:
    """Every metric check of one gate decision."""

    checks: tuple[MetricCheck, ...]

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(check.passed for check in self.checks)

    def summary(self) -> str:
        """All checks on one line, the failing ones marked."""
        return "; ".join(("" if c.passed else "FAILED ") + c.describe() for c in self.checks)


def _missing(metrics: Mapping[str, float], names: list[str]) -> list[str]:
    # NaN is as good as absent: it compares false with everything and would pass or fail silently.
    return [name for name in names if name not in metrics or not math.isfinite(metrics[name])]


def evaluate_gate(
    candidate: Mapping[str, float],
    reference: Mapping[str, float] | None,
    tolerances: Mapping[str, float],
    *,
    candidate_name: str = "candidate",
    reference_name: str = "reference",
) -> GateResult:
    """Check ``candidate`` metrics against ``reference`` (None: the alias names no version yet).

    Raises :class:`EvalMetricsMissing` when either side lacks a gated metric: the gate cannot
    decide, and guessing would let an unevaluated adapter through.
    """
    names = sorted(tolerances)
    lacking = _missing(candidate, names)
    if lacking:
        raise EvalMetricsMissing(
            f"{candidate_name} has no eval metrics {', '.join(lacking)} in its manifest; evaluate it "
            "first, or promote with skip_eval_gate",
            details={"version": candidate_name, "missing": ",".join(lacking)},
        )
    if reference is not None:
        lacking = _missing(reference, names)
        if lacking:
            raise EvalMetricsMissing(
                f"the current version {reference_name} has no eval metrics {', '.join(lacking)} to compare "
                "against; promote with skip_eval_gate",
                details={"version": reference_name, "missing": ",".join(lacking)},
            )
    checks = tuple(
        MetricCheck(name, candidate[name], None if reference is None else reference[name], tolerances[name])
        for name in names
    )
    return GateResult(checks)


def require_gate(result: GateResult, candidate_name: str, reference_name: str) -> None:
    """Raise :class:`EvalGateFailed` naming the failing metrics unless ``result`` passed."""
    if not result.passed:
        raise EvalGateFailed(
            f"{candidate_name} is worse than {reference_name}: {result.summary()}",
            details={"version": candidate_name, "reference": reference_name},
        )
