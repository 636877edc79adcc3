from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core import AnnotatedBox, Box, inside_fraction, region_id, sample_region

from .strategies import FAST, THOROUGH, annotated_objects

IMAGE_W, IMAGE_H = 640, 480


def reference_members(objects: list[AnnotatedBox], seed: int, k: int) -> list[int]:
    """The SPEC's growth rule, written plainly: merge the object nearest the region's centre."""
    members, region = [seed], objects[seed].box
    while len(members) <= k and len(members) < len(objects):
        cx, cy = region.center
        rest = [i for i in range(len(objects)) if i not in members]
        nearest = min(rest, key=lambda i: (math.dist(objects[i].box.center, (cx, cy)), i))
        members.append(nearest)
        region = region.union(objects[nearest].box)
    return members


@THOROUGH
@given(
    annotated_objects(IMAGE_W, IMAGE_H),
    st.integers(1, 6),
    st.sampled_from([0.0, 0.1, 0.5]),
    st.integers(0, 2**32),
)
def test_region_invariants(objects: list[AnnotatedBox], k: int, pad: float, seed: int) -> None:
    region = sample_region(objects, IMAGE_W, IMAGE_H, np.random.default_rng(seed), k=k, pad=pad)
    member_ids = [m.annotation_id for m in region.members]
    assert len(member_ids) == len(set(member_ids)) == min(k + 1, len(objects))
    assert Box(0, 0, IMAGE_W, IMAGE_H).contains(region.box)
    assert all(region.box.contains(m.box) for m in region.members)
    gt_ids = {o.annotation_id for o in region.ground_truth}
    assert set(member_ids) <= gt_ids
    for o in objects:
        assert (o.annotation_id in gt_ids) == (inside_fraction(o.box, region.box) >= 0.5)
    if pad == 0.0:
        union = region.members[0].box
        for m in region.members[1:]:
            union = union.union(m.box)
        assert region.box == union
    # Same seed, same region; and the growth follows the nearest-centre rule.
    again = sample_region(objects, IMAGE_W, IMAGE_H, np.random.default_rng(seed), k=k, pad=pad)
    assert again == region
    seed_index = objects.index(region.members[0])
    assert [objects[i] for i in reference_members(objects, seed_index, k)] == list(region.members)


def test_small_example() -> None:
    objects = [
        AnnotatedBox(1, "cup", Box(0, 0, 10, 10)),
        AnnotatedBox(2, "cup", Box(12, 0, 22, 10)),
        AnnotatedBox(3, "plate", Box(300, 300, 400, 400)),
        AnnotatedBox(4, "crumb", Box(21, 9, 31, 12)),  # 40 % inside the two cups' union
    ]
    for seed in range(20):
        region = sample_region(objects, IMAGE_W, IMAGE_H, np.random.default_rng(seed), k=1)
        if {m.annotation_id for m in region.members} == {1, 2}:
            assert region.box == Box(0, 0, 22, 10)
            assert [o.annotation_id for o in region.ground_truth] == [1, 2]
            return
    pytest.fail("no seed picked a cup")


def test_padding_is_clipped_to_the_image() -> None:
    objects = [AnnotatedBox(1, "dog", Box(0, 0, 100, 100))]
    region = sample_region(objects, 150, 150, np.random.default_rng(0), pad=0.25)
    assert region.box == Box(0, 0, 125, 125)


def test_an_image_without_objects_has_no_region() -> None:
    with pytest.raises(ValueError, match="without objects"):
        sample_region([], IMAGE_W, IMAGE_H, np.random.default_rng(0))


def test_inside_fraction_of_degenerate_boxes() -> None:
    assert inside_fraction(Box(5, 5, 5, 9), Box(0, 0, 10, 10)) == 1.0
    assert inside_fraction(Box(50, 5, 50, 9), Box(0, 0, 10, 10)) == 0.0


@FAST
@given(st.lists(st.integers(), min_size=1, max_size=6, unique=True), st.randoms())
def test_region_id_ignores_member_order(member_ids: list[int], rnd: random.Random) -> None:
    shuffled = list(member_ids)
    rnd.shuffle(shuffled)
    assert region_id("coco", 7, member_ids) == region_id("coco", 7, shuffled)
    assert region_id("coco", 7, member_ids) != region_id("lvis", 7, member_ids)
    assert region_id("coco", 7, member_ids) != region_id("coco", 8, member_ids)
