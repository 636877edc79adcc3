"""Localization scoring of one region's candidates (SPEC §2 "Localization score"), transport-free.

For a region: collect the phrases of all candidates (mention phrases, boxed or not; a candidate without
mentions contributes its sentences), ground the unique ones in the region crop in as few forward passes
as the grounder allows, then per candidate ``P = own boxes ∪ grounded boxes of its phrases`` and
``S_loc`` from :func:`services.core.scoring.localization_scores` (never re-implemented here).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from services.core.scoring import localization_scores
from services.scorers.common import (
    RegionInput,
    box4,
    check_candidates,
    check_deadline,
    load_region,
    scorer_id,
    split_sentences,
)
from services.scorers.localization import metrics
from services.scorers.localization.backends import (
    Detection,
    Grounder,
    GroundingOptions,
    load_onnx_grounder,
    load_torch_grounder,
)
from services.scorers.localization.mllm import MllmGrounder
from services.scorers.localization.settings import GroundingBackend, LocalizationSettings
from spr.v1 import common_pb2, describer_pb2, scoring_pb2

#: Sentences of a mention-less candidate used as phrases (referring expressions for the grounder).
_MAX_FALLBACK_SENTENCES = 3


def candidate_phrases(candidate: describer_pb2.Candidate, limit: int) -> list[str]:
    """Unique phrases of a candidate, in order; its sentences when it has no usable mention."""
    phrases: list[str] = []
    for mention in candidate.mentions:
        phrase = " ".join(mention.phrase.split())
        if phrase and phrase.lower() not in (p.lower() for p in phrases):
            phrases.append(phrase)
    if not phrases and candidate.text.strip():
        phrases = split_sentences(candidate.text)[:_MAX_FALLBACK_SENTENCES]
    return phrases[:limit]


def load_grounder(settings: LocalizationSettings, options: GroundingOptions) -> Grounder:
    """The backend named by the settings."""
    if settings.backend is GroundingBackend.MLLM:
        return MllmGrounder.from_settings(settings.mllm, options)
    if settings.backend is GroundingBackend.ONNX:
        return load_onnx_grounder(settings.model, options, settings.threads, settings.onnx_int8)
    return load_torch_grounder(settings.model, settings.device, options)


class LocalizationScorer:
    """Scores candidates with a grounder; thread-safe for concurrent requests on CPU."""

    def __init__(self, settings: LocalizationSettings, grounder: Grounder | None = None) -> None:
        self.settings = settings
        options = GroundingOptions(settings.box_threshold, settings.max_boxes_per_phrase)
        self.grounder = grounder if grounder is not None else load_grounder(settings, options)
        self.scorer_id = scorer_id(self.grounder.name, settings.model, settings.model_version)

    def score_request(
        self, request: scoring_pb2.ScoreRequest, deadline: float | None = None, source: str = "grpc"
    ) -> scoring_pb2.LocalizationScoreResponse:
        """The gRPC request: every candidate of one region."""
        scores = self._timed(request.region, request.candidates, request.image_bytes, deadline, source)
        return scoring_pb2.LocalizationScoreResponse(scores=scores, scorer_id=self.scorer_id)

    def score_record(
        self, record: describer_pb2.DescriptionRecord, deadline: float | None = None
    ) -> scoring_pb2.LocalizationScoreRecord:
        """The Kafka record: same scores, lineage copied and stamped with this scorer's id."""
        scores = self._timed(record.region, record.candidates, b"", deadline, "kafka")
        return scoring_pb2.LocalizationScoreRecord(
            region_id=record.region.region_id, scores=scores, lineage=self.lineage(record)
        )

    def failure_record(
        self, record: describer_pb2.DescriptionRecord, error: common_pb2.ErrorInfo
    ) -> scoring_pb2.LocalizationScoreRecord:
        """The Kafka record of a description this scorer could not score: no scores, the error."""
        return scoring_pb2.LocalizationScoreRecord(
            region_id=record.region.region_id, lineage=self.lineage(record), error=error
        )

    def lineage(self, record: describer_pb2.DescriptionRecord) -> common_pb2.Lineage:
        """The description's lineage stamped with this scorer's id."""
        lineage = common_pb2.Lineage()
        lineage.CopyFrom(record.lineage)
        lineage.localization_scorer_id = self.scorer_id
        return lineage

    def _timed(
        self,
        region: common_pb2.Region,
        candidates: Sequence[describer_pb2.Candidate],
        image_bytes: bytes,
        deadline: float | None,
        source: str,
    ) -> list[scoring_pb2.LocalizationScore]:
        started = time.monotonic()
        check_candidates(candidates, self.settings.max_candidates)
        scores = self.score(load_region(region, image_bytes, self.settings.images), candidates, deadline)
        metrics.REGION_SECONDS.labels(source).observe(time.monotonic() - started)
        metrics.CANDIDATES.observe(len(candidates))
        for score in scores:
            metrics.S_LOC.observe(score.s_loc)
        return scores

    def score(
        self,
        region: RegionInput,
        candidates: Sequence[describer_pb2.Candidate],
        deadline: float | None = None,
    ) -> list[scoring_pb2.LocalizationScore]:
        """Ground all phrases of the region at once, then S_loc per candidate."""
        per_candidate = [candidate_phrases(c, self.settings.max_phrases_per_candidate) for c in candidates]
        unique = list(dict.fromkeys(p for phrases in per_candidate for p in phrases))
        check_deadline(deadline, "before grounding")
        grounded = self._ground(region, unique, deadline)
        check_deadline(deadline, "after grounding")
        preds: list[list[tuple[float, float, float, float]]] = []
        found: list[list[scoring_pb2.GroundedBox]] = []
        for candidate, phrases in zip(candidates, per_candidate, strict=True):
            own = [box4(m.box) for m in candidate.mentions if m.has_box]
            boxes = [(p, d) for p in phrases for d in grounded.get(p, [])]
            preds.append(own + [d.box for _, d in boxes])
            found.append([_grounded_box(p, d) for p, d in boxes])
        gt = [box4(o.box) for o in region.region.ground_truth]
        results = localization_scores(gt, preds, self.settings.iou_floor, self.settings.precision_weight)
        weight = self.settings.precision_weight
        return [
            scoring_pb2.LocalizationScore(
                candidate_id=candidate.candidate_id,
                s_loc=result.s_loc,
                best_iou_per_gt=result.best_iou_per_gt.tolist(),
                grounded=boxes,
                model_box_count=sum(1 for m in candidate.mentions if m.has_box),
                precision_term=weight * result.precision,
            )
            for candidate, result, boxes in zip(candidates, results, found, strict=True)
        ]

    def _ground(
        self, region: RegionInput, phrases: list[str], deadline: float | None
    ) -> dict[str, list[Detection]]:
        if not phrases:
            return {}
        metrics.PHRASES.observe(len(phrases))
        metrics.FORWARD_PASSES.inc(self.grounder.forward_passes(phrases))
        left, top = region.pixels[0], region.pixels[1]
        detections = self.grounder.ground(region.crop, (float(left), float(top)), phrases, deadline)
        return dict(zip(phrases, detections, strict=True))


def _grounded_box(phrase: str, detection: Detection) -> scoring_pb2.GroundedBox:
    x1, y1, x2, y2 = detection.box
    return scoring_pb2.GroundedBox(
        phrase=phrase, box=common_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2), confidence=detection.score
    )
