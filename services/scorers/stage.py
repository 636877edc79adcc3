"""The scorers' Kafka stage: ``descriptions`` -> ``scores.localization`` / ``scores.semantic`` (SPEC §3).

Transport is the shared :mod:`services.common.stage_runner` (the same discipline as the describer's
stage); a scorer stage only says what one ``DescriptionRecord`` becomes: its score record, keyed by
the region id. Records are scored one at a time by default (``concurrency=1``): a scorer already
batches all candidates of a region into its forward passes, and runs one model at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from google.protobuf.message import Message

from services.common.kafka_io import ConsumedRecord, KafkaSettings, Topic
from services.common.stage_runner import StageRunner, StageSpec
from services.scorers.settings import ScorerStageSettings
from spr.v1 import common_pb2, describer_pb2

R = TypeVar("R", bound=Message)
ScoreFn = Callable[[describer_pb2.DescriptionRecord, float], R]
FailureFn = Callable[[describer_pb2.DescriptionRecord, common_pb2.ErrorInfo], R]


def region_key(record: ConsumedRecord[describer_pb2.DescriptionRecord], output: Message) -> str:
    """Score records are keyed by the region id of the description (its input key when absent)."""
    return record.message.region.region_id or record.key


def score_stage(
    name: str,
    score: ScoreFn[R],
    failure: FailureFn[R],
    output: Topic[R],
    settings: ScorerStageSettings,
    kafka: KafkaSettings | None,
) -> StageRunner[describer_pb2.DescriptionRecord, R]:
    """The stage runner of one scorer: ``descriptions`` -> ``output``.

    A description that cannot be scored goes to the dead-letter topic and, as ``failure`` (a score
    record carrying the error), to ``output`` too: the pair builder decides its region at once. A
    description that carries the describer's error is passed on the same way, without scoring.
    """

    def score_or_pass_on(record: describer_pb2.DescriptionRecord, deadline: float) -> R:
        if record.HasField("error"):  # the describer failed: nothing to score, tell the pair builder
            return failure(record, record.error)
        return score(record, deadline)

    spec: StageSpec[describer_pb2.DescriptionRecord, R] = StageSpec(
        name=name,
        input=Topic(settings.descriptions_topic, describer_pb2.DescriptionRecord),
        output=output,
        dead_letter_topic=settings.dead_letters(),
        # spr-localization / spr-semantic: the names the Admin's stats and the KEDA scalers watch
        group_id=settings.group_id or f"spr-{name.removesuffix('_scorer')}",
        handle=score_or_pass_on,
        key=region_key,
        on_failure=failure,
    )
    return StageRunner(spec, settings, kafka or settings.kafka(f"spr-{name}"))


def stage_metrics_port(server_metrics_port: int, settings: ScorerStageSettings) -> int:
    """The stage's metrics port: its own setting, else the server's + 1 (both may run on one host)."""
    return settings.metrics_port or (server_metrics_port + 1 if server_metrics_port else 0)


__all__: Sequence[str] = ("score_stage", "stage_metrics_port")
