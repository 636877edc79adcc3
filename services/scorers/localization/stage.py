"""``python -m services.scorers.localization.stage`` (``spr-localization-scorer-stage``).

Transport is the shared :mod:`services.common.stage_runner`; this module wires the localization scorer
and its output topic.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from services.common.kafka_io import KafkaSettings, Topic
from services.common.settings import load_settings
from services.common.stage_runner import StageRunner, serve_stage
from services.common.topics import SCORES_LOCALIZATION
from services.scorers.localization.logic import LocalizationScorer
from services.scorers.stage import score_stage, stage_metrics_port
from spr.v1 import describer_pb2, scoring_pb2

STAGE_NAME = "localization_scorer"


def make_stage(
    scorer: LocalizationScorer, kafka: KafkaSettings | None = None
) -> StageRunner[describer_pb2.DescriptionRecord, scoring_pb2.LocalizationScoreRecord]:
    """The stage around an existing scorer (its settings name the topics)."""
    settings = scorer.settings.stage
    output = Topic(settings.scores_topic or SCORES_LOCALIZATION, scoring_pb2.LocalizationScoreRecord)
    return score_stage(STAGE_NAME, scorer.score_record, scorer.failure_record, output, settings, kafka)


def main(argv: Sequence[str] | None = None) -> None:
    """Run until SIGTERM/SIGINT."""
    from services.scorers.localization.settings import LocalizationSettings

    settings = load_settings(LocalizationSettings, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stage = make_stage(LocalizationScorer(settings))
    port = stage_metrics_port(settings.metrics_port, settings.stage)
    serve_stage(stage, port, settings.metrics_host, settings.metrics_enabled)


if __name__ == "__main__":
    main()
