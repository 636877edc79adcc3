"""Prometheus metrics of the pair builder (conventions: services.common.metrics)."""

from __future__ import annotations

from services.common import metrics

_UNIT = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

DECISIONS = metrics.counter(
    "spr_pairs_decisions",
    "Region decisions produced to `pairs`, by outcome: pair, or the skip reason in lower case.",
    ("outcome",),
)
DEAD_LETTERS = metrics.counter(
    "spr_pairs_dead_letters", "Input records sent to the dead-letter topic, by error code.", ("code",)
)
DROPPED = metrics.counter(
    "spr_pairs_dropped_records",
    "Input records not joined: late (region already decided) or duplicate (region already has one).",
    ("reason", "topic"),
)
RECORDS = metrics.counter("spr_pairs_records", "Input records consumed, by topic.", ("topic",))
CANDIDATES = metrics.counter("spr_pairs_candidates", "Scored candidates of the decided regions.")
OPEN_REGIONS = metrics.gauge("spr_pairs_open_regions", "Regions waiting for some of their records.")
JOIN_SECONDS = metrics.histogram(
    "spr_pairs_join_seconds", "Time from a region's first record to its decision (in this process)."
)
DECIDE_BATCH = metrics.histogram(
    "spr_pairs_decide_batch_regions",
    "Regions decided together in one batch (the regions one poll completed).",
    (),
    (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
DECIDE_SECONDS = metrics.histogram(
    "spr_pairs_decide_seconds", "Wall time of deciding one batch of regions (refinement, scores, selection)."
)
REWARD = metrics.histogram("spr_pairs_reward", "Reward of the chosen and rejected texts.", ("role",), _UNIT)
BOXES_REPLACED = metrics.histogram(
    "spr_pairs_boxes_replaced",
    "Boxes of the chosen text that refinement replaced by their GT box, per pair.",
    (),
    (0, 1, 2, 3, 5, 8),
)
# The children every pair updates, looked up once (``labels()`` costs as much as the update itself).
PAIRS_BUILT = DECISIONS.labels("pair")
CHOSEN_REWARD = REWARD.labels("chosen")
REJECTED_REWARD = REWARD.labels("rejected")
MARGIN = metrics.histogram("spr_pairs_margin", "Reward margin of the pairs built.", (), _UNIT)
CONSUMER_LAG = metrics.gauge(
    "spr_pairs_consumer_lag_records",
    "Records behind the high watermark, per input partition.",
    ("topic", "partition"),
)
COMMITS = metrics.counter("spr_pairs_commits", "Offset commits, by result (ok, failed).", ("result",))
RECOVERIES = metrics.counter(
    "spr_pairs_recoveries",
    "Produce failures or timeouts after which the builder re-read from its commit point.",
)
