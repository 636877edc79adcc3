"""Hand-built stream records of one region: a DescriptionRecord and its two score records.

Shared by the pair builder tests and ``bench/bench_pairs.py``. Each region has a few GT objects in a
crop shown to the model at its own size; every candidate mentions some of them with jittered boxes
(BRACKET_999 markup), so refinement has real work, and the score records name every candidate.
"""

from __future__ import annotations

import random

from services.core import Box, CoordinateFormat, mentions_to_image, parse, render_box
from services.describer.logic import mention_proto
from spr.v1 import common_pb2, describer_pb2, scoring_pb2

FMT = CoordinateFormat.BRACKET_999
FRAME = 400  # the crop is shown to the model as a FRAME x FRAME image
CATEGORIES = ("red circle", "blue square", "green triangle", "yellow star")


def pb_box(box: tuple[float, float, float, float]) -> common_pb2.Box:
    return common_pb2.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3])


def description(
    region_id: str, candidates: int = 8, seed: int = 0, run_id: str = ""
) -> describer_pb2.DescriptionRecord:
    """A region with 3 GT objects and `candidates` descriptions of 2-3 jittered boxes each."""
    rng = random.Random(f"{region_id}/{seed}")
    crop = (100.0, 100.0, 100.0 + FRAME, 100.0 + FRAME)
    gt = [_random_box(rng, crop) for _ in range(3)]
    region = common_pb2.Region(
        region_id=region_id,
        box=pb_box(crop),
        ground_truth=[
            common_pb2.AnnotatedObject(annotation_id=i, category=CATEGORIES[i], box=pb_box(b))
            for i, b in enumerate(gt)
        ],
    )
    return describer_pb2.DescriptionRecord(
        region=region,
        candidates=[_candidate(region_id, i, rng, gt, crop) for i in range(candidates)],
        lineage=common_pb2.Lineage(
            adapter_version="spr-v1-aaaa0000", prompt_template_id="t/v1", run_id=run_id
        ),
        crop_box=pb_box(crop),
        frame_width=FRAME,
        frame_height=FRAME,
        prompt="Describe the region.",
    )


def localization(
    record: describer_pb2.DescriptionRecord, seed: int = 0
) -> scoring_pb2.LocalizationScoreRecord:
    """S_loc per candidate and one grounded box per candidate (full-image pixels)."""
    rng = random.Random(f"loc/{record.region.region_id}/{seed}")
    crop = (record.crop_box.x1, record.crop_box.y1, record.crop_box.x2, record.crop_box.y2)
    scores = [
        scoring_pb2.LocalizationScore(
            candidate_id=c.candidate_id,
            s_loc=rng.uniform(0.0, 1.0),
            grounded=[
                scoring_pb2.GroundedBox(phrase="thing", box=pb_box(_random_box(rng, crop)), confidence=0.5)
            ],
        )
        for c in record.candidates
    ]
    lineage = common_pb2.Lineage()
    lineage.CopyFrom(record.lineage)
    lineage.localization_scorer_id = "gdino@1"
    return scoring_pb2.LocalizationScoreRecord(
        region_id=record.region.region_id, scores=scores, lineage=lineage
    )


def semantic(record: describer_pb2.DescriptionRecord, seed: int = 0) -> scoring_pb2.SemanticScoreRecord:
    """S_sem per candidate."""
    rng = random.Random(f"sem/{record.region.region_id}/{seed}")
    scores = [
        scoring_pb2.SemanticScore(candidate_id=c.candidate_id, s_sem=rng.uniform(0.2, 0.9))
        for c in record.candidates
    ]
    lineage = common_pb2.Lineage()
    lineage.CopyFrom(record.lineage)
    lineage.semantic_scorer_id = "clip@1"
    return scoring_pb2.SemanticScoreRecord(region_id=record.region.region_id, scores=scores, lineage=lineage)


def _random_box(
    rng: random.Random, within: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = within
    w, h = rng.uniform(0.1, 0.4) * (x1 - x0), rng.uniform(0.1, 0.4) * (y1 - y0)
    x, y = rng.uniform(x0, x1 - w), rng.uniform(y0, y1 - h)
    return (x, y, x + w, y + h)


def _candidate(
    region_id: str,
    index: int,
    rng: random.Random,
    gt: list[tuple[float, float, float, float]],
    crop: tuple[float, float, float, float],
) -> describer_pb2.Candidate:
    parts = []
    for k in rng.sample(range(len(gt)), rng.randint(2, 3)):
        x1, y1, x2, y2 = gt[k]
        jitter = rng.uniform(0.0, 0.25) * (x2 - x1)
        frame_box = Box(
            x1 - crop[0] + rng.uniform(-jitter, jitter),
            y1 - crop[1] + rng.uniform(-jitter, jitter),
            x2 - crop[0] + rng.uniform(-jitter, jitter),
            y2 - crop[1] + rng.uniform(-jitter, jitter),
        )
        parts.append(f"a {CATEGORIES[k]} {render_box(frame_box, FMT, FRAME, FRAME)}")
    text = "There is " + ", and ".join(parts) + (" in the grass." if index % 2 else ".")
    # The mentions as the describer sends them: its parse of the text, boxes in full-image pixels.
    mentions = mentions_to_image(parse(text, FMT, FRAME, FRAME).mentions, Box(*crop), FRAME, FRAME)
    return describer_pb2.Candidate(
        candidate_id=f"{region_id}#{index}",
        sample_index=index,
        text=text,
        mentions=[mention_proto(m) for m in mentions],
        coordinate_format=FMT.value,
    )
