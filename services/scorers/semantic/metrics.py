"""Prometheus metrics of the semantic scorer (conventions: services.common.metrics)."""

from __future__ import annotations

from services.common import metrics

_SCORE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

REGION_SECONDS = metrics.histogram(
    "spr_semantic_region_seconds",
    "Time to score all candidates of one region (image, encoders, scores), by source (grpc/kafka).",
    ("source",),
)
CANDIDATES = metrics.histogram(
    "spr_semantic_batch_candidates", "Candidates per scored region.", (), buckets=(1, 2, 4, 8, 16, 32, 64)
)
SENTENCES = metrics.histogram(
    "spr_semantic_batch_sentences",
    "Sentences embedded per region (all candidates together).",
    (),
    buckets=(1, 4, 8, 16, 32, 64, 128, 256),
)
S_SEM = metrics.histogram("spr_semantic_s_sem", "Distribution of S_sem.", (), buckets=_SCORE_BUCKETS)
