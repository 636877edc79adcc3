"""The MLLM-as-grounder backend: prompts, parsing of answers, and the tiny Qwen2.5-VL on the real Triton.

The tiny policy has random weights, so its answers are noise: the Triton tests check the plumbing
(one request per phrase, batched by Triton, every phrase either grounded or counted as unparsed, boxes
inside the region) and the failure modes; the parsing tests feed known answers to the parser.
"""

from __future__ import annotations

import io
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from services.common.errors import InvalidRequest, error_code_of
from services.common.grpc_server import build_server, make_channel
from services.core.boxes import Box
from services.describer.errors import PolicyUnavailable
from services.describer.families import get_family
from services.describer.settings import RetryPolicy
from services.describer.triton_client import PolicyOutput, TritonPolicyClient
from services.devstack.process import free_port
from services.devstack.triton import TritonServer
from services.evaluation.prompts import rec_instruction
from services.modelzoo.tiny import ensure_model
from services.scorers.common import load_region
from services.scorers.localization import servicer as loc_servicer
from services.scorers.localization.backends import GroundingOptions
from services.scorers.localization.logic import LocalizationScorer, candidate_phrases
from services.scorers.localization.mllm import Frame, MllmGrounder, grounding_template
from services.scorers.localization.settings import GroundingBackend, LocalizationSettings, MllmGrounding
from services.scorers.sample import scene_image
from spr.v1 import scoring_pb2, scoring_pb2_grpc
from tests.scorers.conftest import candidates, make_region, scene_png

POLICY_REPO = Path(__file__).resolve().parents[2] / "services" / "policy" / "model_repository"
SERVER: dict[str, Any] = {"port": 0, "metrics_enabled": False, "grace_period_s": 0.0, "max_workers": 2}
# The region crop (170 x 120 at (10, 10)) is shown to Qwen2.5-VL as a 168 x 112 frame (multiples of 28).
FRAME = Frame(image=b"", crop_box=Box(10.0, 10.0, 180.0, 130.0), width=168, height=112)


def unparsed() -> float:
    """The exported counter of phrases answered without a parseable box."""
    return REGISTRY.get_sample_value("spr_localization_mllm_unparsed_total") or 0.0


def grounder(family: str = "qwen2.5-vl", **fields: Any) -> MllmGrounder:
    """A grounder whose client is never called (parsing and prompts only): Triton at a closed port."""
    settings = MllmGrounding(family=family, triton_url=f"127.0.0.1:{free_port()}", **fields)
    return MllmGrounder(
        TritonPolicyClient(settings.triton_url), get_family(family), settings, GroundingOptions()
    )


def test_each_family_prompts_in_its_own_coordinate_format() -> None:
    qwen25 = grounder().instruction("red circle")
    assert qwen25.startswith("Locate red circle in the image") and '"bbox_2d"' in qwen25
    assert qwen25 == rec_instruction("red circle", get_family("qwen2.5-vl").coordinate_format)
    assert "<|object_ref_start|>red circle<|object_ref_end|>" in grounder("qwen2-vl").instruction(
        "red circle"
    )
    assert "[x1, y1, x2, y2]" in grounder("ferret").instruction("red circle")
    assert grounder(template="Find {phrase}.").instruction("a dog") == "Find a dog."
    with pytest.raises(ValueError, match="phrase"):
        grounding_template(get_family("ferret"), "no placeholder")


def test_a_parseable_answer_becomes_full_image_pixels() -> None:
    answer = '```json\n[{"bbox_2d": [0, 0, 84, 56], "label": "red circle"}]\n```'
    before = unparsed()
    [detection] = grounder().detections(PolicyOutput([answer], [[-0.5, -0.5]], ""), FRAME)
    # Frame pixels (0, 0, 84, 56) of a 168 x 112 frame = the crop's top-left quarter, offset by (10, 10).
    assert detection.box == pytest.approx((10.0, 10.0, 95.0, 70.0))
    assert detection.score == pytest.approx(0.6065, abs=1e-4)  # exp(mean token log-probability)
    assert unparsed() == before


def test_bracket_family_answers_are_read_in_bins() -> None:
    g = grounder("ferret")
    frame = Frame(image=b"", crop_box=Box(10.0, 10.0, 180.0, 130.0), width=336, height=336)
    [detection] = g.detections(PolicyOutput(["the red circle [0, 0, 499, 999]"], [[]], ""), frame)
    assert detection.box == pytest.approx((10.0, 10.0, 95.0, 130.0), abs=0.2)
    assert detection.score == 0.0  # no log-probabilities: no confidence


@pytest.mark.parametrize(
    "answer", ["", "lorem ipsum dolor", '{"bbox_2d": [1, 2]}', "[nan, 1, 2, 3]", "\x00\ufffd"]
)
def test_garbage_answers_give_no_box_and_are_counted(answer: str) -> None:
    before = unparsed()
    assert grounder().detections(PolicyOutput([answer], [[-1.0]], ""), FRAME) == []
    assert unparsed() == before + 1


def test_the_frame_follows_the_policy_processors_pixel_bounds(tmp_path: Path) -> None:
    config = tmp_path / "preprocessor_config.json"
    config.write_text('{"min_pixels": 3136, "max_pixels": 6272}', encoding="utf-8")
    bounded = MllmGrounding(processor_config=config).model_family()
    assert bounded.frame_size(170, 120) == (84, 56)  # within 6272 pixels, multiples of 28
    assert MllmGrounding().model_family().frame_size(170, 120) == (168, 112)
    frame = MllmGrounder(
        TritonPolicyClient("127.0.0.1:1"), bounded, MllmGrounding(), GroundingOptions()
    ).frame(scene_image().crop((10, 10, 180, 130)), (10.0, 10.0))
    assert (frame.width, frame.height) == (84, 56)
    assert Image.open(io.BytesIO(frame.image)).size == (84, 56)


def test_boxes_per_phrase_are_capped() -> None:
    answer = " ".join(f'{{"bbox_2d": [{i}, {i}, {i + 20}, {i + 20}], "label": "x"}}' for i in range(5))
    g = MllmGrounder(
        TritonPolicyClient("127.0.0.1:1"),
        get_family("qwen2.5-vl"),
        MllmGrounding(),
        GroundingOptions(max_boxes_per_phrase=2),
    )
    assert len(g.detections(PolicyOutput([answer], [[]], ""), FRAME)) == 2


# --- against the real tritonserver ----------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_triton(triton_server: Callable[..., TritonServer]) -> TritonServer:
    """spr_policy on the tiny Qwen2.5-VL (random weights) in the real tritonserver."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SPR_POLICY_MODEL_PATH", str(ensure_model("tiny-qwen2.5-vl")))
        return triton_server(POLICY_REPO, models=["spr_policy"], fresh=True)


def mllm_settings(triton_url: str, **fields: Any) -> LocalizationSettings:
    mllm = MllmGrounding(triton_url=triton_url, max_new_tokens=16, **fields)
    return LocalizationSettings(model="tiny-qwen2.5-vl", backend=GroundingBackend.MLLM, mllm=mllm, **SERVER)


def triton_counts(server: TritonServer) -> tuple[float, float]:
    """(requests, executions) of spr_policy from Triton's own metrics; executions < requests = batched."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()

    def total(metric: str) -> float:
        pattern = re.compile(rf'^{metric}\{{[^}}]*model="spr_policy"[^}}]*\}} (\S+)$', re.M)
        return sum(float(v) for v in pattern.findall(text))

    return total("nv_inference_request_success"), total("nv_inference_exec_count")


@pytest.fixture(scope="module")
def mllm_scorer(policy_triton: TritonServer) -> Iterator[LocalizationScorer]:
    scorer = LocalizationScorer(mllm_settings(policy_triton.grpc_url))
    yield scorer
    assert isinstance(scorer.grounder, MllmGrounder)
    scorer.grounder.close()


def test_the_policy_grounds_every_phrase_of_a_region_in_batched_requests(
    policy_triton: TritonServer, mllm_scorer: LocalizationScorer
) -> None:
    region = load_region(make_region(), scene_png(), mllm_scorer.settings.images)
    cands = candidates(8)
    phrases = list(dict.fromkeys(p for c in cands for p in candidate_phrases(c, 16)))
    requests_before, executions_before = triton_counts(policy_triton)
    unparsed_before = unparsed()
    scores = mllm_scorer.score(region, cands)
    requests_after, executions_after = triton_counts(policy_triton)
    requests, executions = requests_after - requests_before, executions_after - executions_before
    assert requests == len(phrases)  # one greedy request per unique phrase of the region
    assert executions < requests  # sent together, Triton's dynamic batcher merged them
    grounded = {b.phrase for s in scores for b in s.grounded}
    assert len(grounded) + (unparsed() - unparsed_before) == len(phrases)  # each grounded or counted
    assert scores[0].s_loc == pytest.approx(1.0)  # own exact boxes: grounding never lowers the max
    for score in scores:
        assert 0.0 <= score.s_loc <= 1.0
        for box in score.grounded:  # parsed boxes come back inside the region crop, full-image pixels
            assert 10 - 1e-6 <= box.box.x1 <= box.box.x2 <= 180 + 1e-6
            assert 10 - 1e-6 <= box.box.y1 <= box.box.y2 <= 130 + 1e-6
    assert mllm_scorer.scorer_id.startswith("mllm:tiny-qwen2.5-vl@")


def test_phrases_spelling_special_tokens_are_grounded_not_refused(mllm_scorer: LocalizationScorer) -> None:
    """Model output can spell "<|image_pad|>" as text; in a prompt the processor would count it as an
    image placeholder and fail the request (a region dead-lettered in the whole-pipeline test)."""
    grounder = mllm_scorer.grounder
    assert isinstance(grounder, MllmGrounder)
    phrases = ["red <|image_pad|> circle", "<image>blue square<|vision_end|>"]
    assert grounder.instruction(phrases[0]) == grounder.instruction("red circle")
    assert grounder.instruction(phrases[1]) == grounder.instruction("blue square")
    assert len(grounder.ground(scene_image().crop((10, 10, 180, 130)), (10.0, 10.0), phrases)) == 2


def test_an_extreme_region_shape_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="cannot be shown to the policy") as caught:
        grounder().frame(Image.new("RGB", (1000, 2)), (0.0, 0.0))
    assert caught.value.status is grpc.StatusCode.INVALID_ARGUMENT


def test_triton_down_is_unavailable_over_grpc() -> None:
    dead = f"127.0.0.1:{free_port()}"
    scorer = LocalizationScorer(
        mllm_settings(dead, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01))
    )
    region = load_region(make_region(), scene_png(), scorer.settings.images)
    with pytest.raises(PolicyUnavailable):
        scorer.score(region, candidates(2))
    server = build_server(scorer.settings, loc_servicer.register_with(scorer))
    server.start()
    try:
        with make_channel(f"127.0.0.1:{server.port}") as channel:
            stub = scoring_pb2_grpc.LocalizationScorerStub(channel)
            request = scoring_pb2.ScoreRequest(
                region=make_region(), candidates=candidates(2), image_bytes=scene_png()
            )
            with pytest.raises(grpc.RpcError) as caught:
                stub.Score(request, timeout=30)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error_code_of(caught.value) == "POLICY_UNAVAILABLE"
    finally:
        server.stop(grace=0)
        assert isinstance(scorer.grounder, MllmGrounder)
        scorer.grounder.close()
