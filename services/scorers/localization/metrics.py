"""Prometheus metrics of the localization scorer (conventions: services.common.metrics)."""

from __future__ import annotations

from services.common import metrics

REGION_SECONDS = metrics.histogram(
    "spr_localization_region_seconds",
    "Time to score all candidates of one region (image, grounding, S_loc), by source (grpc/kafka).",
    ("source",),
)
CANDIDATES = metrics.histogram(
    "spr_localization_batch_candidates",
    "Candidates per scored region.",
    (),
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
PHRASES = metrics.histogram(
    "spr_localization_batch_phrases",
    "Unique phrases grounded per region (all candidates together).",
    (),
    buckets=(0, 1, 4, 8, 16, 32, 64, 128),
)
FORWARD_PASSES = metrics.counter("spr_localization_forward_passes", "Grounding model forward passes.")
S_LOC = metrics.histogram(
    "spr_localization_s_loc",
    "Distribution of S_loc.",
    (),
    buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
MLLM_UNPARSED = metrics.counter(
    "spr_localization_mllm_unparsed",
    "Phrases the MLLM grounder answered without a parseable box (they get no grounded box).",
)
