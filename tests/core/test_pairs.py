from __future__ import annotations

import pytest

from services.core import PairChoice, ScoredCandidate, SkipDecision, SkipReason, pair_id, select_pair
from spr.v1 import pairs_pb2


def cand(cid: str, text: str, r: float, refined: bool = False) -> ScoredCandidate:
    return ScoredCandidate(cid, text, s_sem=r, s_loc=r, reward=r, refined=refined)


def test_chosen_is_best_refined_and_rejected_is_worst_initial() -> None:
    initial = [cand("a", "x", 0.4), cand("b", "y", 0.2), cand("c", "z", 0.6)]
    refined = [cand("a'", "x'", 0.5, True), cand("c'", "z'", 0.7, True)]
    decision = select_pair(initial, refined)
    assert isinstance(decision, PairChoice)
    assert (decision.chosen, decision.rejected) == (refined[1], initial[1])
    assert decision.margin == pytest.approx(0.5)


def test_without_refined_candidates_the_best_initial_is_chosen() -> None:
    initial = [cand("a", "x", 0.4), cand("b", "y", 0.2)]
    decision = select_pair(initial)
    assert isinstance(decision, PairChoice) and (decision.chosen, decision.rejected) == tuple(initial)


@pytest.mark.parametrize(
    ("initial", "refined", "reason"),
    [
        ([], [cand("a'", "x", 0.9, True)], SkipReason.TOO_FEW_CANDIDATES),
        ([cand("a", "x", 0.9)], [], SkipReason.TOO_FEW_CANDIDATES),
        ([cand("a", "x", 0.5), cand("b", "y", 0.47)], [], SkipReason.MARGIN_BELOW_DELTA),
        ([cand("a", "x", 0.5), cand("b", "y", 0.5)], [], SkipReason.MARGIN_BELOW_DELTA),  # a tie
        ([cand("a", "same", 0.2)], [cand("a'", "same", 0.9, True)], SkipReason.SAME_TEXT),
    ],
)
def test_skips(initial: list[ScoredCandidate], refined: list[ScoredCandidate], reason: SkipReason) -> None:
    decision = select_pair(initial, refined)
    assert isinstance(decision, SkipDecision) and decision.reason is reason and decision.detail


def test_delta_is_configurable() -> None:
    initial = [cand("a", "x", 0.5), cand("b", "y", 0.47)]
    assert isinstance(select_pair(initial, delta=0.01), PairChoice)


def test_skip_reasons_match_the_proto_enum() -> None:
    for reason in SkipReason:
        assert pairs_pb2.SkipReason.Value(reason.proto_name) == reason.value


def test_scores_must_be_finite_and_score_uses_the_reward_formula() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        ScoredCandidate("a", "x", float("nan"), 0.5, 0.5)
    scored = ScoredCandidate.score("a", "x", s_sem=1.0, s_loc=0.0)
    assert scored.reward == pytest.approx(0.8)


def test_pair_id_is_deterministic_short_hex_and_unambiguous() -> None:
    assert pair_id("r1", "run") == pair_id("r1", "run")
    assert len(pair_id("r1", "run")) == 16 and int(pair_id("r1", "run"), 16) >= 0
    assert pair_id("r1", "run") != pair_id("r1", "run2")
    assert pair_id("ab", "c") != pair_id("a", "bc")
