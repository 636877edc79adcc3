"""The spr.v1 contracts: generated code is fresh, messages round-trip, services are declared."""

from __future__ import annotations

from services.common import protogen
from spr.v1 import adapters_pb2, common_pb2, describer_pb2, pairs_pb2, scoring_pb2


def test_generated_code_is_not_stale() -> None:
    assert protogen.stale_files() == [], "run `spr-protogen` and commit the result"


def test_pair_decision_round_trips_with_lineage() -> None:
    region = common_pb2.Region(
        region_id="ds/1/abc",
        image=common_pb2.ImageRef(uri="file:///data/1.jpg", width=640, height=480),
        box=common_pb2.Box(x1=10, y1=20, x2=300, y2=400),
        ground_truth=[
            common_pb2.AnnotatedObject(annotation_id=7, category="cat", box=common_pb2.Box(x2=5, y2=5))
        ],
    )
    pair = pairs_pb2.PreferencePair(
        pair_id="p1",
        region=region,
        chosen=pairs_pb2.ScoredText(text="a cat [1, 2, 3, 4]", reward=0.9, refined=True),
        rejected=pairs_pb2.ScoredText(text="a dog", reward=0.1),
        lineage=common_pb2.Lineage(adapter_version="spr-v1-00ff", prompt_template_id="crop-refs/v1"),
    )
    decision = pairs_pb2.PairDecision(region_id=region.region_id, pair=pair)
    decoded = pairs_pb2.PairDecision.FromString(decision.SerializeToString())
    assert decoded == decision
    assert decoded.WhichOneof("decision") == "pair"
    skip = pairs_pb2.PairDecision(region_id="r", skip=pairs_pb2.SKIP_REASON_MARGIN_BELOW_DELTA)
    assert pairs_pb2.PairDecision.FromString(skip.SerializeToString()).WhichOneof("decision") == "skip"


def test_every_service_of_the_spec_is_declared() -> None:
    declared = {
        name
        for module in (describer_pb2, scoring_pb2, adapters_pb2)
        for name in module.DESCRIPTOR.services_by_name
    }
    assert declared == {"Describer", "LocalizationScorer", "SemanticScorer", "Admin"}
    describe = describer_pb2.DESCRIPTOR.services_by_name["Describer"].methods_by_name["DescribeRegion"]
    assert describe.server_streaming and not describe.client_streaming
    assert set(adapters_pb2.DESCRIPTOR.services_by_name["Admin"].methods_by_name) >= {
        "ListAdapters",
        "Promote",
        "Rollback",
        "GetPipelineStats",
    }
