"""Prometheus metrics of the trainer, and the TRL callback that feeds them."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge
from transformers import TrainerCallback

LOSS = Gauge("spr_trainer_loss", "Last logged DPO training loss.")
REWARD_MARGIN = Gauge(
    "spr_trainer_reward_margin", "Last logged chosen-minus-rejected reward margin.", ["split"]
)
REWARD = Gauge(
    "spr_trainer_reward",
    "Last logged implicit reward beta * (log pi - log pi_ref) of the chosen or rejected answers; a falling "
    "chosen reward means the answers the round prefers became less likely than under the base.",
    ["split", "answer"],
)
PREFERENCE_ACCURACY = Gauge(
    "spr_trainer_preference_accuracy", "Fraction of pairs whose chosen reward beats the rejected.", ["split"]
)
REC_ACCURACY = Gauge(
    "spr_trainer_rec_accuracy",
    "Mean REC Acc@0.5..0.9 (points) of the last REC gate, candidate and reference on the same set.",
    ["side"],
)
PAIRS_CONSUMED = Counter("spr_trainer_pairs_consumed_total", "Pairs trained on (committed rounds).")
PAIRS_ALREADY_TRAINED = Counter(
    "spr_trainer_pairs_already_trained_total", "Pairs dropped: a published version was trained on them."
)
ADAPTERS_PUBLISHED = Counter("spr_trainer_adapters_published_total", "Adapter versions published.")
PROMOTIONS = Counter("spr_trainer_promotions_total", "Versions moved to stable by the eval gate.")
ROUNDS = Counter("spr_trainer_rounds_total", "Training rounds by outcome.", ["outcome"])


class MetricsCallback(TrainerCallback):
    """Mirrors TRL's logged loss / margin / accuracy / rewards into the gauges as training goes."""

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any
    ) -> None:
        """Called by the HF Trainer at every logging step (train and eval)."""
        if not logs:
            return
        for prefix, split in (("", "train"), ("eval_", "heldout")):
            if f"{prefix}rewards/margins" in logs:
                REWARD_MARGIN.labels(split).set(logs[f"{prefix}rewards/margins"])
            if f"{prefix}rewards/accuracies" in logs:
                PREFERENCE_ACCURACY.labels(split).set(logs[f"{prefix}rewards/accuracies"])
            for answer in ("chosen", "rejected"):
                if f"{prefix}rewards/{answer}" in logs:
                    REWARD.labels(split, answer).set(logs[f"{prefix}rewards/{answer}"])
        if "loss" in logs:
            LOSS.set(logs["loss"])
