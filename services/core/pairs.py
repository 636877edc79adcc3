"""Preference pairs (SPEC §2, "Pairs"): chosen = best refined, rejected = worst initial, or a skip."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from services.core.ids import stable_id
from services.core.scoring import DEFAULT_LAMBDA, reward

DEFAULT_DELTA = 0.05


class SkipReason(IntEnum):
    """Values and names match proto ``spr.v1.SkipReason`` (``SKIP_REASON_<name>``)."""

    MARGIN_BELOW_DELTA = 1
    SAME_TEXT = 2
    TOO_FEW_CANDIDATES = 3
    SCORES_TIMED_OUT = 4  # decided by the pair builder's join, never by select_pair
    SCORING_FAILED = 5  # likewise: a scorer sent an error record instead of scores
    DESCRIBE_FAILED = 6  # likewise: the describer sent an error record instead of candidates

    @property
    def proto_name(self) -> str:
        return f"SKIP_REASON_{self.name}"


@dataclass(frozen=True, slots=True)
class ScoredCandidate:
    """One description with its scores (proto ``ScoredText``)."""

    candidate_id: str
    text: str
    s_sem: float
    s_loc: float
    reward: float
    refined: bool = False
    boxes_replaced: int = 0

    def __post_init__(self) -> None:
        # A NaN reward would silently win or lose every comparison in select_pair.
        if not (math.isfinite(self.s_sem) and math.isfinite(self.s_loc) and math.isfinite(self.reward)):
            raise ValueError(f"candidate {self.candidate_id!r} has a non-finite score")

    @classmethod
    def score(
        cls,
        candidate_id: str,
        text: str,
        s_sem: float,
        s_loc: float,
        lam: float = DEFAULT_LAMBDA,
        refined: bool = False,
        boxes_replaced: int = 0,
    ) -> ScoredCandidate:
        """Build a candidate whose reward is ``λ · S_sem + (1 − λ) · S_loc``."""
        return cls(candidate_id, text, s_sem, s_loc, reward(s_sem, s_loc, lam), refined, boxes_replaced)


@dataclass(frozen=True, slots=True)
class PairChoice:
    chosen: ScoredCandidate
    rejected: ScoredCandidate
    margin: float  # chosen.reward - rejected.reward


@dataclass(frozen=True, slots=True)
class SkipDecision:
    reason: SkipReason
    detail: str


def select_pair(
    initial: Sequence[ScoredCandidate],
    refined: Sequence[ScoredCandidate] = (),
    delta: float = DEFAULT_DELTA,
) -> PairChoice | SkipDecision:
    """Chosen = best-rewarded refined candidate (best initial one when none was refined), rejected =
    lowest-rewarded initial candidate; skip when they are the same text or the margin is below δ.

    Ties keep the earliest candidate, so a decision is reproducible from the same inputs.
    """
    if not initial or len(initial) + len(refined) < 2:
        return SkipDecision(SkipReason.TOO_FEW_CANDIDATES, f"{len(initial)} initial, {len(refined)} refined")
    if refined:
        chosen, rejectable = max(refined, key=_by_reward), list(initial)
    else:  # the chosen one is initial too: the rejected one must be another candidate
        best = max(range(len(initial)), key=lambda i: initial[i].reward)
        chosen, rejectable = initial[best], [c for i, c in enumerate(initial) if i != best]
    rejected = min(rejectable, key=_by_reward)
    if chosen.text == rejected.text:
        return SkipDecision(SkipReason.SAME_TEXT, f"{chosen.candidate_id} vs {rejected.candidate_id}")
    margin = chosen.reward - rejected.reward
    if margin < delta:
        return SkipDecision(SkipReason.MARGIN_BELOW_DELTA, f"margin {margin:.4f} < delta {delta:g}")
    return PairChoice(chosen, rejected, margin)


def _by_reward(candidate: ScoredCandidate) -> float:
    return candidate.reward


def pair_id(region_id: str, run_id: str) -> str:
    """Idempotency key of a region's pair in one run: the same inputs always give the same id."""
    return stable_id("pair", region_id, run_id)
