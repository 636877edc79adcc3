"""``python -m services.scorers.localization.stage`` (``spr-localization-scorer-stage``).

The loop is the shared :class:`services.scorers.stage.ScoreStage`; this module wires the localization
scorer, its output topic and its metrics.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from services.common.kafka_io import KafkaSettings, Topic
from services.common.settings import load_settings
from services.common.topics import SCORES_LOCALIZATION
from services.scorers.localization import metrics
from services.scorers.localization.logic import LocalizationScorer
from services.scorers.stage import ScoreStage, run_stage, stage_metrics_port
from spr.v1 import scoring_pb2

STAGE_NAME = "localization_scorer"


def make_stage(
    scorer: LocalizationScorer, kafka: KafkaSettings | None = None
) -> ScoreStage[scoring_pb2.LocalizationScoreRecord]:
    """The stage around an existing scorer (its settings name the topics)."""
    settings = scorer.settings.stage
    output = Topic(settings.scores_topic or SCORES_LOCALIZATION, scoring_pb2.LocalizationScoreRecord)
    return ScoreStage(STAGE_NAME, scorer.score_record, output, settings, metrics.STAGE_RECORDS, kafka)


def main(argv: Sequence[str] | None = None) -> None:
    """Run until SIGTERM/SIGINT."""
    from services.scorers.localization.settings import LocalizationSettings

    settings = load_settings(LocalizationSettings, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stage = make_stage(LocalizationScorer(settings))
    port = stage_metrics_port(settings.metrics_port, settings.stage)
    run_stage(stage, port, settings.metrics_host, settings.metrics_enabled)


if __name__ == "__main__":
    main()
