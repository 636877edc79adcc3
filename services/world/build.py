"""`spr-world`: write a shapes world (COCO annotations + PNGs) and its referring-expression splits.

    spr-world OUT --images 2000 --seed 0 --test-fraction 0.25

Writes `OUT/annotations.json`, `OUT/images/*.png`, and `OUT/rec_train.json` / `OUT/rec_test.json` in
`spr-rec/v1` (`services.evaluation.datasets`). Images are split by index (the last `test_fraction` of
them are held out), so no test image is ever seen in training. Deterministic by seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.evaluation.datasets import write_spr_rec
from services.world.referring import WorldObject, refer
from services.world.scenes import SceneConfig, generate_world

SPLITS = ("train", "test")


@dataclass(frozen=True)
class WorldFiles:
    annotations: Path
    rec: dict[str, Path]


def world_objects(coco: dict[str, Any]) -> dict[int, list[WorldObject]]:
    """Objects per image id, in annotation (drawing) order, from a world's COCO annotations."""
    objects: dict[int, list[WorldObject]] = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        attributes = ann["attributes"]
        objects[ann["image_id"]].append(
            WorldObject(
                annotation_id=ann["id"],
                box=(x, y, x + w, y + h),
                color=attributes["color"],
                shape=attributes["shape"],
                texture=attributes.get("texture", "plain"),
                visible_fraction=attributes.get("visible_fraction", 1.0),
            )
        )
    return objects


def rec_expressions(coco: dict[str, Any], image_ids: set[int], seed: int) -> list[dict[str, Any]]:
    """`spr-rec/v1` expression records for the given images (one per referable object)."""
    records = []
    for image_id, objects in sorted(world_objects(coco).items()):
        if image_id not in image_ids:
            continue
        rng = random.Random(f"{seed}/{image_id}")
        for referral in refer(objects, rng):
            records.append(
                {
                    "id": f"{image_id}-{referral.target.annotation_id}",
                    "image_id": image_id,
                    "annotation_id": referral.target.annotation_id,
                    "text": referral.text,
                    "boxes": [list(referral.target.box)],
                    "kind": referral.expression.kind,
                    "category_ambiguous": referral.category_ambiguous,
                }
            )
    return records


def split_image_ids(coco: dict[str, Any], test_fraction: float) -> dict[str, set[int]]:
    ids = sorted(image["id"] for image in coco["images"])
    cut = len(ids) - round(len(ids) * test_fraction)
    return {"train": set(ids[:cut]), "test": set(ids[cut:])}


def build_world(
    out: Path, num_images: int, seed: int = 0, cfg: SceneConfig | None = None, test_fraction: float = 0.25
) -> WorldFiles:
    """The world's COCO annotations and images, plus its REC train/test splits."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    # The same cut as `split_image_ids`: the last images are held out (and drawn without the
    # single-object curriculum, see `generate_world`).
    annotations = generate_world(
        out, num_images, seed=seed, cfg=cfg, held_out_from=num_images - round(num_images * test_fraction)
    )
    coco = json.loads(annotations.read_text())
    rec = {}
    for split, ids in split_image_ids(coco, test_fraction).items():
        images = [image for image in coco["images"] if image["id"] in ids]
        expressions = rec_expressions(coco, ids, seed)
        rec[split] = write_spr_rec(out / f"rec_{split}.json", f"shapes-{seed}-{split}", images, expressions)
    return WorldFiles(annotations, rec)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spr-world", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--images", type=int, default=1000, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.25, help="share of images held out")
    parser.add_argument("--max-objects", type=int, default=SceneConfig.max_objects)
    parser.add_argument(
        "--single-object-share",
        type=float,
        default=SceneConfig.single_object_share,
        help="share of one-object training scenes",
    )
    args = parser.parse_args(argv)
    cfg = SceneConfig(max_objects=args.max_objects, single_object_share=args.single_object_share)
    files = build_world(args.out, args.images, args.seed, cfg, args.test_fraction)
    print(f"annotations\t{files.annotations}")
    for split, path in files.rec.items():
        count = len(json.loads(path.read_text())["expressions"])
        print(f"rec_{split}\t{path}\t{count} expressions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
