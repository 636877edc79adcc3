"""Turn a COCO-format dataset into `spr.v1.Region` records with the core sampler (SPEC section 2).

Deterministic: region `i` of image `image_id` under `seed` is always the same region, whatever
order images are visited in, because each draw has its own generator seeded by (seed, image, i).
That is what makes sampling reproducible and resumable without storing the random state.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from services.core import AnnotatedBox, Box, CocoDataset, ImageRecord, region_id, sample_region
from services.core.sampler import DEFAULT_K, SAMPLER_VERSION
from spr.v1 import common_pb2


def box_proto(box: Box) -> common_pb2.Box:
    return common_pb2.Box(x1=box.x1, y1=box.y1, x2=box.x2, y2=box.y2)


def object_proto(obj: AnnotatedBox) -> common_pb2.AnnotatedObject:
    return common_pb2.AnnotatedObject(
        annotation_id=obj.annotation_id, category=obj.category, box=box_proto(obj.box)
    )


def region_for(
    dataset: CocoDataset, image: ImageRecord, index: int, seed: int, k: int = DEFAULT_K, pad: float = 0.0
) -> common_pb2.Region | None:
    """Region number `index` of `image` (None for an image without objects)."""
    objects = dataset.objects_by_image.get(image.image_id, [])
    if not objects:
        return None
    rng = np.random.default_rng([seed, image.image_id, index])
    sampled = sample_region(objects, image.width, image.height, rng, k=k, pad=pad)
    return common_pb2.Region(
        region_id=region_id(dataset.dataset_id, image.image_id, [m.annotation_id for m in sampled.members]),
        dataset_id=dataset.dataset_id,
        image_id=image.image_id,
        image=common_pb2.ImageRef(uri=image.uri, width=image.width, height=image.height),
        box=box_proto(sampled.box),
        members=[object_proto(m) for m in sampled.members],
        ground_truth=[object_proto(g) for g in sampled.ground_truth],
        sampler_seed=seed,
        sampler_version=SAMPLER_VERSION,
    )


def iter_regions(
    dataset: CocoDataset, seed: int, per_image: int = 1, k: int = DEFAULT_K, pad: float = 0.0
) -> Iterator[common_pb2.Region]:
    """`per_image` regions of every image with objects, images in id order, duplicates dropped.

    Two draws of one image can merge the same members; they would share a region id (the Kafka key)
    and their pairs would collide, so only the first is kept.
    """
    seen: set[str] = set()
    for image_id in sorted(dataset.images):
        for index in range(per_image):
            region = region_for(dataset, dataset.images[image_id], index, seed, k, pad)
            if region is not None and region.region_id not in seen:
                seen.add(region.region_id)
                yield region
