"""The describer's Kafka stage: ``regions`` -> ``descriptions`` (SPEC §3, stream topology).

Transport (consumer group, batching, pause/resume, commit after acknowledgement, retries with
backoff, dead letters, drain on SIGTERM) is the shared :mod:`services.common.stage_runner`; this
module only says what one record becomes: a ``common_pb2.Region`` is described by
:meth:`Describer.describe_region_record` into one ``DescriptionRecord`` keyed by the region id.
Records of a batch are described ``stage.concurrency`` at a time, so Triton can batch them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from services.common.kafka_io import ConsumedRecord, KafkaSettings, Topic
from services.common.settings import load_settings
from services.common.stage_runner import StageRunner, StageSpec, serve_stage
from services.describer.logic import Describer
from services.describer.settings import DescriberSettings, StageSettings
from spr.v1 import common_pb2, describer_pb2

_LOG = logging.getLogger(__name__)

STAGE_NAME = "describer"


def region_key(record: ConsumedRecord[common_pb2.Region], output: describer_pb2.DescriptionRecord) -> str:
    """Descriptions are keyed by their region id (the input key when the region has none)."""
    return output.region.region_id or record.key


def stage_spec(
    describer: Describer, settings: StageSettings
) -> StageSpec[common_pb2.Region, describer_pb2.DescriptionRecord]:
    """The describer stage: its topics, group and per-record logic."""

    def describe(region: common_pb2.Region, deadline: float) -> describer_pb2.DescriptionRecord:
        return describer.describe_region_record(region, deadline=deadline)

    return StageSpec(
        name=STAGE_NAME,
        input=Topic(settings.regions_topic, common_pb2.Region),
        output=Topic(settings.descriptions_topic, describer_pb2.DescriptionRecord),
        dead_letter_topic=settings.dead_letter_topic,
        group_id=settings.group_id,
        handle=describe,
        key=region_key,
        on_failure=describer.failure_record,  # without it the region would never get a decision
    )


class DescriberStage(StageRunner[common_pb2.Region, describer_pb2.DescriptionRecord]):
    """Consumes regions, produces descriptions; :meth:`run` until stopped (:meth:`step` in tests)."""

    def __init__(
        self, describer: Describer, settings: StageSettings, kafka: KafkaSettings | None = None
    ) -> None:
        self.describer = describer
        super().__init__(stage_spec(describer, settings), settings, kafka or settings.kafka())


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m services.describer.stage`` (``spr-describer-stage``): run until SIGTERM/SIGINT."""
    settings = load_settings(DescriberSettings, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    describer = Describer(settings)
    try:
        stage = DescriberStage(describer, settings.stage)
        serve_stage(stage, settings.stage.metrics_port, settings.metrics_host, settings.metrics_enabled)
    finally:
        describer.close()


if __name__ == "__main__":
    main()
