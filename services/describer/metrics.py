"""Prometheus metrics of the describer (conventions: services.common.metrics).

Errors by code are the shared ``spr_errors_total{component, code}``: the gRPC bootstrap counts the
errors of RPCs (component ``describer``), the Kafka stage its own (component ``describer_stage``).
Label ``source`` is ``grpc`` or ``kafka``.
"""

from __future__ import annotations

from services.common import metrics

#: Label values of ``source``.
SOURCE_GRPC = "grpc"
SOURCE_KAFKA = "kafka"

REQUESTS = metrics.counter(
    "spr_describer_requests",
    "Region descriptions asked for, by source and outcome (ok/error).",
    ("source", "outcome"),
)
REQUEST_SECONDS = metrics.histogram(
    "spr_describer_request_seconds",
    "Time to describe one region (image loading, prompt, Triton, parsing), by source.",
    ("source",),
)
CANDIDATES = metrics.counter(
    "spr_describer_candidates",
    "Candidates produced, by whether any box could be parsed from them (has_boxes true/false).",
    ("has_boxes",),
)
PARSE_WARNINGS = metrics.counter(
    "spr_describer_parse_warnings",
    "Boxes in model output that were repaired or dropped while parsing, by coordinate format.",
    ("coordinate_format",),
)
TRITON_SECONDS = metrics.histogram(
    "spr_describer_triton_seconds",
    "Latency of one Triton inference attempt, by outcome (ok, or the error code it mapped to).",
    ("outcome",),
)
TRITON_RETRIES = metrics.counter(
    "spr_describer_triton_retries", "Triton calls retried because Triton was unreachable or not ready."
)
