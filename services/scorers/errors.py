"""Error codes of the scorers (on top of the shared image/region codes of services.common.errors)."""

from __future__ import annotations

import grpc

from services.common.errors import SprError


class NoCandidates(SprError):
    """A score request or description record carries no candidate to score."""

    code = "NO_CANDIDATES"
    status = grpc.StatusCode.INVALID_ARGUMENT


class TooManyCandidates(SprError):
    """More candidates than the scorer's ``max_candidates`` in one request."""

    code = "TOO_MANY_CANDIDATES"
    status = grpc.StatusCode.INVALID_ARGUMENT


class CandidateInvalid(SprError):
    """A candidate is malformed: empty or duplicate id, or a mention box that is not a valid box."""

    code = "CANDIDATE_INVALID"
    status = grpc.StatusCode.INVALID_ARGUMENT


class ImageMissing(SprError):
    """The request has neither image bytes nor an image URI."""

    code = "IMAGE_MISSING"
    status = grpc.StatusCode.INVALID_ARGUMENT


class ScorerTimeout(SprError):
    """The caller's deadline ran out before the scorer finished."""

    code = "SCORER_DEADLINE_EXCEEDED"
    status = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True
