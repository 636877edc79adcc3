"""Semantic scoring of one region's candidates (SPEC §2 "Semantic score"), transport-free.

Dual encoders (CLIP, SigLIP): ``S_sem = ½ (crop_score + local_score)`` with
``crop_score = clip(w · max(cos(crop, text), 0))`` and ``local_score`` the same mapping of the region
embedding pooled from the full image's patches (CLIPScore style, w = 2.5, clipped to [0, 1]). A text is
split into sentences, each embedded separately, and the sentence embeddings averaged.

Text reference (MiniLM): the region's annotations become a reference ("red circle, blue square"); the
candidate's averaged sentence embedding is compared with it: ``max(cos, 0)`` for both terms (sentence
embeddings are not CLIP-calibrated, so no w).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from services.scorers.common import (
    RegionInput,
    check_candidates,
    check_deadline,
    config_hash,
    load_region,
    scorer_id,
    split_sentences,
)
from services.scorers.semantic import metrics
from services.scorers.semantic.backends import (
    DualEncoder,
    MiniLmEncoder,
    load_onnx_encoder,
    load_torch_encoder,
)
from services.scorers.semantic.settings import SemanticBackend, SemanticSettings
from spr.v1 import common_pb2, describer_pb2, scoring_pb2

FloatArray = npt.NDArray[np.float32]
Encoder = DualEncoder | MiniLmEncoder


def clip_score(cos: FloatArray | float, weight: float) -> FloatArray:
    """CLIPScore mapping ``w · max(cos, 0)``, clipped to [0, 1]."""
    return np.clip(weight * np.maximum(np.asarray(cos, dtype=np.float64), 0.0), 0.0, 1.0)


def reference_text(region: common_pb2.Region) -> str:
    """Unique categories of the region's ground truth (members if none), e.g. "red circle, blue square"."""
    objects = region.ground_truth or region.members
    return ", ".join(dict.fromkeys(o.category.strip() for o in objects if o.category.strip()))


def load_encoder(settings: SemanticSettings) -> Encoder:
    """The backend named by the settings."""
    if settings.backend is SemanticBackend.MINILM:
        return MiniLmEncoder(settings.device)
    if settings.backend is SemanticBackend.ONNX:
        return load_onnx_encoder(
            settings.model, settings.threads, settings.onnx_int8, settings.text_cache_size
        )
    return load_torch_encoder(settings.model, settings.device, settings.text_cache_size)


class SemanticScorer:
    """Scores candidates with a dual encoder or the MiniLM text reference."""

    def __init__(self, settings: SemanticSettings, encoder: Encoder | None = None) -> None:
        self.settings = settings
        self.encoder = encoder if encoder is not None else load_encoder(settings)
        if isinstance(self.encoder, MiniLmEncoder):
            version = settings.model_version or config_hash(self.encoder.path)
            self.scorer_id = scorer_id(self.encoder.name, MiniLmEncoder.MODEL_ID, version)
        else:
            self.scorer_id = scorer_id(self.encoder.name, settings.model, settings.model_version)

    def score_request(
        self, request: scoring_pb2.ScoreRequest, deadline: float | None = None, source: str = "grpc"
    ) -> scoring_pb2.SemanticScoreResponse:
        """The gRPC request: every candidate of one region."""
        scores = self._timed(request.region, request.candidates, request.image_bytes, deadline, source)
        return scoring_pb2.SemanticScoreResponse(scores=scores, scorer_id=self.scorer_id)

    def score_record(
        self, record: describer_pb2.DescriptionRecord, deadline: float | None = None
    ) -> scoring_pb2.SemanticScoreRecord:
        """The Kafka record: same scores, lineage copied and stamped with this scorer's id."""
        scores = self._timed(record.region, record.candidates, b"", deadline, "kafka")
        return scoring_pb2.SemanticScoreRecord(
            region_id=record.region.region_id, scores=scores, lineage=self.lineage(record)
        )

    def failure_record(
        self, record: describer_pb2.DescriptionRecord, error: common_pb2.ErrorInfo
    ) -> scoring_pb2.SemanticScoreRecord:
        """The Kafka record of a description this scorer could not score: no scores, the error."""
        return scoring_pb2.SemanticScoreRecord(
            region_id=record.region.region_id, lineage=self.lineage(record), error=error
        )

    def lineage(self, record: describer_pb2.DescriptionRecord) -> common_pb2.Lineage:
        """The description's lineage stamped with this scorer's id."""
        lineage = common_pb2.Lineage()
        lineage.CopyFrom(record.lineage)
        lineage.semantic_scorer_id = self.scorer_id
        return lineage

    def _timed(
        self,
        region: common_pb2.Region,
        candidates: Sequence[describer_pb2.Candidate],
        image_bytes: bytes,
        deadline: float | None,
        source: str,
    ) -> list[scoring_pb2.SemanticScore]:
        started = time.monotonic()
        check_candidates(candidates, self.settings.max_candidates)
        if isinstance(self.encoder, MiniLmEncoder):  # needs no pixels: skip loading the image
            scores = self.score_reference(region, candidates, deadline)
        else:
            loaded = load_region(region, image_bytes, self.settings.images)
            scores = self.score(loaded, candidates, deadline)
        metrics.REGION_SECONDS.labels(source).observe(time.monotonic() - started)
        metrics.CANDIDATES.observe(len(candidates))
        for score in scores:
            metrics.S_SEM.observe(score.s_sem)
        return scores

    def score(
        self,
        region: RegionInput,
        candidates: Sequence[describer_pb2.Candidate],
        deadline: float | None = None,
    ) -> list[scoring_pb2.SemanticScore]:
        """Dual-encoder scores: one vision pass for the region, text batched across candidates."""
        if not isinstance(self.encoder, DualEncoder):
            raise TypeError("score() needs a dual encoder; use score_reference() for MiniLM")
        crop, local = self.encoder.encode_region(region.image, region.pixels)
        check_deadline(deadline, "after the vision pass")
        texts, counts = self._texts(candidates)
        embeds = self._embed(texts, counts)
        weight = self.settings.clip_weight
        crop_scores, local_scores = clip_score(embeds @ crop, weight), clip_score(embeds @ local, weight)
        return [
            _score(c.candidate_id, float(cs), float(ls), n)
            for c, cs, ls, n in zip(candidates, crop_scores, local_scores, counts, strict=True)
        ]

    def score_reference(
        self,
        region: common_pb2.Region,
        candidates: Sequence[describer_pb2.Candidate],
        deadline: float | None = None,
    ) -> list[scoring_pb2.SemanticScore]:
        """MiniLM scores: similarity of each candidate to the region's annotation reference."""
        reference = reference_text(region)
        texts, counts = self._texts(candidates)
        check_deadline(deadline, "before embedding")
        embeds = self._embed(texts, counts)
        if not reference:  # nothing annotated: no reference to agree with
            sims = np.zeros(len(candidates))
        else:
            ref = self._encode([reference])[0]
            sims = np.maximum(embeds @ ref, 0.0)
        return [
            _score(c.candidate_id, float(s), float(s), n)
            for c, s, n in zip(candidates, sims, counts, strict=True)
        ]

    def _texts(self, candidates: Sequence[describer_pb2.Candidate]) -> tuple[list[str], list[int]]:
        per = [split_sentences(c.text)[: self.settings.max_sentences] for c in candidates]
        metrics.SENTENCES.observe(sum(len(p) for p in per))
        return [s for p in per for s in p], [len(p) for p in per]

    def _embed(self, texts: list[str], counts: list[int]) -> FloatArray:
        """Per candidate: the mean of its sentence embeddings, renormalised."""
        if self.settings.batch_texts:
            sentences = self._encode(texts)
        else:  # one call per candidate (the unbatched baseline of the benchmark)
            starts = np.cumsum([0, *counts])
            sentences = np.concatenate([self._encode(texts[a:b]) for a, b in itertools.pairwise(starts)])
        starts = np.cumsum([0, *counts[:-1]])
        means = np.add.reduceat(sentences, starts, axis=0) / np.asarray(counts)[:, None]
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        normalized: FloatArray = (means / np.maximum(norms, 1e-12)).astype(np.float32)
        return normalized

    def _encode(self, texts: Sequence[str]) -> FloatArray:
        if isinstance(self.encoder, MiniLmEncoder):
            return self.encoder.encode(texts)
        return self.encoder.encode_texts(texts)


def _score(candidate_id: str, crop: float, local: float, sentences: int) -> scoring_pb2.SemanticScore:
    return scoring_pb2.SemanticScore(
        candidate_id=candidate_id,
        s_sem=0.5 * (crop + local),
        crop_score=crop,
        local_score=local,
        sentence_count=sentences,
    )
