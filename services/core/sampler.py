"""Region sampling (SPEC §2, "Region sampling")."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.core.boxes import AnnotatedBox, Box
from services.core.ids import stable_id

DEFAULT_K = 4
GT_MIN_INSIDE_FRACTION = 0.5
SAMPLER_VERSION = "nearest-centre-v1"  # bump when a change would sample different regions for a seed


@dataclass(frozen=True, slots=True)
class SampledRegion:
    box: Box  # full-image pixels
    members: tuple[AnnotatedBox, ...]  # merged objects, seed first, in merge order
    ground_truth: tuple[AnnotatedBox, ...]  # every object >= 50 % inside box, in input order


def sample_region(
    objects: Sequence[AnnotatedBox],
    image_w: float,
    image_h: float,
    rng: np.random.Generator,
    k: int = DEFAULT_K,
    pad: float = 0.0,
) -> SampledRegion:
    """Seed a region with a random object, then merge the object whose box centre is nearest the
    region's centre until the region holds more than ``k`` objects or none are left.

    The region is the union of its members, each side padded by ``pad`` times its width/height and
    clipped to the image. Its GT is every object with at least half its area inside. Objects are
    expected inside the image (``read_coco`` clips them); an image without objects has no region.
    """
    if not objects:
        raise ValueError("cannot sample a region from an image without objects")
    centres = np.array([o.box.center for o in objects], dtype=np.float64)
    available = np.ones(len(objects), dtype=bool)
    seed = int(rng.integers(len(objects)))
    members = [seed]
    available[seed] = False
    union = objects[seed].box
    while len(members) <= k and available.any():
        cx, cy = union.center
        distance = np.hypot(centres[:, 0] - cx, centres[:, 1] - cy)
        nearest = int(np.argmin(np.where(available, distance, np.inf)))  # ties: lowest index
        members.append(nearest)
        available[nearest] = False
        union = union.union(objects[nearest].box)
    region = union.pad(pad).clip(image_w, image_h)
    ground_truth = tuple(o for o in objects if inside_fraction(o.box, region) >= GT_MIN_INSIDE_FRACTION)
    return SampledRegion(region, tuple(objects[i] for i in members), ground_truth)


def inside_fraction(box: Box, region: Box) -> float:
    """Share of ``box``'s area inside ``region``; a degenerate box counts as inside when contained."""
    if box.area <= 0.0:
        return 1.0 if region.contains(box) else 0.0
    return box.intersection_area(region) / box.area


def region_id(dataset_id: str, image_id: int, member_ids: Iterable[int]) -> str:
    """Stable region id (the Kafka key of every record of the region): independent of merge order."""
    return stable_id("region", dataset_id, image_id, sorted(member_ids))
