"""``spr.v1.SemanticScorer`` over gRPC: a thin adapter from the RPC to :class:`.logic.SemanticScorer`.

Errors are typed SprErrors; the shared bootstrap (:mod:`services.common.grpc_server`) maps them to
their gRPC status with the code in the ``spr-error-code`` trailer. The call's deadline is checked
between model passes (SCORER_DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import grpc

from services.common.grpc_server import RegisterFn
from services.scorers.semantic.logic import SemanticScorer
from services.scorers.semantic.settings import SemanticSettings
from spr.v1 import scoring_pb2, scoring_pb2_grpc


class SemanticScorerServicer(scoring_pb2_grpc.SemanticScorerServicer):
    """Scores every candidate of one region per call."""

    def __init__(self, scorer: SemanticScorer) -> None:
        self.scorer = scorer

    def Score(
        self, request: scoring_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> scoring_pb2.SemanticScoreResponse:
        """All candidates of the request's region."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        return self.scorer.score_request(request, deadline=deadline)


def make_register(settings: SemanticSettings) -> RegisterFn:
    """The RegisterFn of ``run_service``: one scorer (model loaded once) per process."""
    return register_with(SemanticScorer(settings))


def register_with(scorer: SemanticScorer) -> RegisterFn:
    """A RegisterFn adding a servicer around an existing scorer (tests, embedding)."""

    def register(server: grpc.Server) -> Iterable[str]:
        scoring_pb2_grpc.add_SemanticScorerServicer_to_server(SemanticScorerServicer(scorer), server)
        return [scoring_pb2.DESCRIPTOR.services_by_name["SemanticScorer"].full_name]

    return register
