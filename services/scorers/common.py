"""Transport-free helpers shared by both scorers: checked inputs, region images, sentences, scorer ids."""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from services.common.errors import InvalidRequest
from services.common.images import ImageLimits, box_to_pixels, load_image
from services.scorers.errors import (
    CandidateInvalid,
    ImageMissing,
    NoCandidates,
    ScorerTimeout,
    TooManyCandidates,
)
from spr.v1 import common_pb2, describer_pb2

Box4 = tuple[float, float, float, float]

# Sentence ends: ., ! or ? followed by blank space, or a line break. Box markup such as "[0.1, 0.2]"
# contains no blank after its dots, so it stays inside its sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class RegionInput:
    """What every scorer needs about one region: the decoded image and the region box in pixels."""

    image: Image.Image
    region: common_pb2.Region
    pixels: tuple[int, int, int, int]  # integer crop bounds of the region (left, top, right, bottom)

    @property
    def crop(self) -> Image.Image:
        """The region crop of the full image."""
        return self.image.crop(self.pixels)


def box4(box: common_pb2.Box) -> Box4:
    """A protobuf box as a tuple."""
    return (box.x1, box.y1, box.x2, box.y2)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (SPEC §2: long text is embedded sentence by sentence); never empty."""
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]
    return sentences or [text.strip() or "."]


def check_candidates(candidates: Sequence[describer_pb2.Candidate], max_candidates: int) -> None:
    """Bad input fails with a specific code before any model runs."""
    if not candidates:
        raise NoCandidates("the request has no candidates")
    if len(candidates) > max_candidates:
        raise TooManyCandidates(
            f"{len(candidates)} candidates, at most {max_candidates} per request",
            details={"max_candidates": max_candidates},
        )
    seen: set[str] = set()
    for candidate in candidates:
        if not candidate.candidate_id or candidate.candidate_id in seen:
            raise CandidateInvalid(f"empty or duplicate candidate_id {candidate.candidate_id!r}")
        seen.add(candidate.candidate_id)
        for mention in candidate.mentions:
            if mention.has_box and not _valid_box(box4(mention.box)):
                raise CandidateInvalid(
                    f"candidate {candidate.candidate_id}: invalid mention box {box4(mention.box)}"
                )


def _valid_box(box: Box4) -> bool:
    return all(math.isfinite(v) for v in box) and box[2] >= box[0] and box[3] >= box[1]


def load_region(region: common_pb2.Region, image_bytes: bytes, limits: ImageLimits) -> RegionInput:
    """Decode the image (bytes win over ``region.image.uri``) and validate the region box against it."""
    if not region.HasField("box"):
        raise InvalidRequest("the region has no box")
    source: bytes | str = image_bytes or region.image.uri
    if not source:
        raise ImageMissing("neither image_bytes nor region.image.uri is set")
    sha = region.image.sha256 if not image_bytes else None
    image = load_image(source, limits, expected_sha256=sha or None)
    pixels = box_to_pixels(region.box, image.width, image.height)
    return RegionInput(image=image, region=region, pixels=pixels)


def check_deadline(deadline: float | None, what: str) -> None:
    """Raise ScorerTimeout when the monotonic ``deadline`` has passed (checked between model passes)."""
    if deadline is not None and time.monotonic() > deadline:
        raise ScorerTimeout(f"deadline exceeded {what}")


def scorer_id(kind: str, model: str | Path, version: str = "") -> str:
    """``"<kind>:<model name>@<version>"``; version defaults to a content hash of the model's config,
    so two different weights under one folder name never share an id in the lineage."""
    name = Path(str(model)).name or str(model)
    return f"{kind}:{name}@{version or config_hash(model)}"


def config_hash(model: str | Path) -> str:
    """12 hex digits over the model folder's config/manifest files (or the id itself if not a folder)."""
    folder = Path(str(model))
    digest = hashlib.sha256(str(model).encode() if not folder.is_dir() else b"")
    for name in ("config.json", "manifest.json", "spr-tiny-model.json", "config_sentence_transformers.json"):
        path = folder / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
