"""The KafkaTopics are exactly the topics the code uses: stream, compacted adapters, dead letters."""

from __future__ import annotations

from typing import Any

import pytest

from services.admin.settings import DEFAULT_STAGES
from services.common import topics
from services.describer.settings import StageSettings
from services.pairs.settings import PairBuilderSettings
from services.scorers.settings import ScorerStageSettings
from tests.deploy.manifests import OVERLAYS, of_kind, rendered


def _code_topics() -> set[str]:
    """Every topic named in services.common.topics, plus each stage's default dead-letter topic."""
    named = {
        value
        for name, value in vars(topics).items()
        if name.isupper() and isinstance(value, str) and name != "DEAD_LETTER_SUFFIX"
    }
    dead_letters = {
        StageSettings().dead_letter_topic,
        ScorerStageSettings().dead_letters(),
        PairBuilderSettings().dead_letter_topic,
    }
    for stage in DEFAULT_STAGES:
        dead_letters.update(stage.dead_letter_topics)
    return named | dead_letters


def _topics(overlay: str) -> dict[str, dict[str, Any]]:
    return {t["spec"]["topicName"]: t["spec"] for t in of_kind(rendered(overlay), "KafkaTopic")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifest_topics_are_the_codes(overlay: str) -> None:
    assert set(_topics(overlay)) == _code_topics()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_adapters_is_compacted_and_stream_topics_share_partitions(overlay: str) -> None:
    declared = _topics(overlay)
    assert declared[topics.ADAPTERS]["config"]["cleanup.policy"] == "compact"
    stream = {declared[name]["partitions"] for name in topics.stream_topics()}
    assert len(stream) == 1, "region-keyed topics must share one partition count (the pair builder joins)"
    partitions = next(iter(stream))
    pairs_config = next(
        c for c in of_kind(rendered(overlay), "ConfigMap") if c["metadata"]["name"] == "spr-pairs"
    )
    assert int(pairs_config["data"]["SPR_PAIRS_PARTITIONS"]) == partitions
    for scaled in of_kind(rendered(overlay), "ScaledObject"):
        assert scaled["spec"]["maxReplicaCount"] <= partitions, "more replicas than partitions stay idle"


def test_every_topic_belongs_to_the_strimzi_cluster() -> None:
    objects = rendered("gpu-prod")
    cluster = of_kind(objects, "Kafka")[0]["metadata"]["name"]
    for topic in of_kind(objects, "KafkaTopic"):
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert 1 <= topic["spec"]["replicas"] <= of_kind(objects, "KafkaNodePool")[0]["spec"]["replicas"]
