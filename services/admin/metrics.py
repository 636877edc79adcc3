"""Prometheus metrics of the admin service (conventions: services.common.metrics).

Errors by code are the shared ``spr_errors_total{component="admin", code}``. Label ``alias`` takes
the few alias names of a deployment (latest, stable, ...), never versions.
"""

from __future__ import annotations

from services.common import metrics

#: Label values of ``action``.
ACTION_PROMOTE = "promote"
ACTION_ROLLBACK = "rollback"

ALIAS_MOVES = metrics.counter(
    "spr_admin_alias_moves",
    "Aliases re-pointed through the Admin API, by alias and action (promote/rollback).",
    ("alias", "action"),
)
PROMOTIONS_REFUSED = metrics.counter(
    "spr_admin_promotions_refused",
    "Promotions refused by the eval gate, by alias and reason (eval_gate_failed/eval_metrics_missing).",
    ("alias", "reason"),
)
GATE_SKIPPED = metrics.counter(
    "spr_admin_eval_gate_skipped",
    "Promotions of gated aliases that skipped the eval gate, by alias.",
    ("alias",),
)
REPLICA_SCRAPES = metrics.counter(
    "spr_admin_replica_scrapes", "Scrapes of policy replica metrics, by outcome (ok/error).", ("outcome",)
)
CONSUMER_LAG = metrics.gauge(
    "spr_admin_consumer_lag_records",
    "Records not yet committed by each stage's consumer group (updated by GetPipelineStats).",
    ("stage",),
)
DEAD_LETTERS = metrics.gauge(
    "spr_admin_dead_letter_records",
    "Records ever written to each stage's dead-letter topics (updated by GetPipelineStats).",
    ("stage",),
)
TRAINING_TRIGGERS = metrics.counter(
    "spr_admin_training_triggers", "On-demand training rounds queued on trainer.control (TriggerTraining)."
)
