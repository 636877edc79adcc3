"""The eval gate: not worse than the current version by more than the tolerance, metrics required."""

from __future__ import annotations

import math

import pytest

from services.admin.errors import EvalGateFailed, EvalMetricsMissing
from services.admin.gate import evaluate_gate, require_gate

TOLERANCES = {"eval_preference_accuracy": 0.01, "eval_reward_margin": 0.05}
STABLE = {"eval_preference_accuracy": 0.70, "eval_reward_margin": 0.50}


@pytest.mark.parametrize(
    ("candidate", "passed"),
    [
        ({"eval_preference_accuracy": 0.75, "eval_reward_margin": 0.60}, True),  # better
        ({"eval_preference_accuracy": 0.695, "eval_reward_margin": 0.46}, True),  # worse, within tolerance
        ({"eval_preference_accuracy": 0.68, "eval_reward_margin": 0.90}, False),  # accuracy dropped 0.02
        ({"eval_preference_accuracy": 0.80, "eval_reward_margin": 0.40}, False),  # margin dropped 0.10
    ],
)
def test_candidate_against_the_current_version(candidate: dict[str, float], passed: bool) -> None:
    result = evaluate_gate(candidate, STABLE, TOLERANCES)
    assert result.passed is passed
    if not passed:
        with pytest.raises(EvalGateFailed, match="FAILED"):
            require_gate(result, "spr-v2-x", "stable (spr-v1-y)")


def test_without_a_current_version_the_candidate_only_needs_its_metrics() -> None:
    assert evaluate_gate(
        {"eval_preference_accuracy": 0.1, "eval_reward_margin": -1.0}, None, TOLERANCES
    ).passed


@pytest.mark.parametrize(
    ("candidate", "reference", "who"),
    [
        ({"eval_preference_accuracy": 0.9}, STABLE, "spr-v2-x"),  # candidate lacks the margin
        ({"eval_preference_accuracy": math.nan, "eval_reward_margin": 1.0}, STABLE, "spr-v2-x"),  # NaN
        ({}, None, "spr-v2-x"),
        (STABLE, {"eval_reward_margin": 0.5}, "stable"),  # the reference lacks accuracy
    ],
)
def test_missing_metrics_are_a_precondition_failure_naming_who_lacks_them(
    candidate: dict[str, float], reference: dict[str, float] | None, who: str
) -> None:
    with pytest.raises(EvalMetricsMissing, match=who) as caught:
        evaluate_gate(candidate, reference, TOLERANCES, candidate_name="spr-v2-x", reference_name="stable")
    assert "skip_eval_gate" in caught.value.message
