"""``python -m services.scorers.semantic.stage`` (``spr-semantic-scorer-stage``).

Transport is the shared :mod:`services.common.stage_runner`; this module wires the semantic scorer
and its output topic.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from services.common.kafka_io import KafkaSettings, Topic
from services.common.settings import load_settings
from services.common.stage_runner import StageRunner, serve_stage
from services.common.topics import SCORES_SEMANTIC
from services.scorers.semantic.logic import SemanticScorer
from services.scorers.stage import score_stage, stage_metrics_port
from spr.v1 import describer_pb2, scoring_pb2

STAGE_NAME = "semantic_scorer"


def make_stage(
    scorer: SemanticScorer, kafka: KafkaSettings | None = None
) -> StageRunner[describer_pb2.DescriptionRecord, scoring_pb2.SemanticScoreRecord]:
    """The stage around an existing scorer (its settings name the topics)."""
    settings = scorer.settings.stage
    output = Topic(settings.scores_topic or SCORES_SEMANTIC, scoring_pb2.SemanticScoreRecord)
    return score_stage(STAGE_NAME, scorer.score_record, scorer.failure_record, output, settings, kafka)


def main(argv: Sequence[str] | None = None) -> None:
    """Run until SIGTERM/SIGINT."""
    from services.scorers.semantic.settings import SemanticSettings

    settings = load_settings(SemanticSettings, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stage = make_stage(SemanticScorer(settings))
    port = stage_metrics_port(settings.metrics_port, settings.stage)
    serve_stage(stage, port, settings.metrics_host, settings.metrics_enabled)


if __name__ == "__main__":
    main()
