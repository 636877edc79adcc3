"""Bootstrap + REC benchmark: wall time of the bootstrap, REC Acc@{0.5..0.9} of the policy on held-out
expressions (against a random-box floor measured in the same run), and the time of a cache hit.

    python bench/bench_rec.py                       # the default recipe on this machine's CPU
    python bench/bench_rec.py --steps 200 --eval 500 --cache /tmp/spr-bench

Timings on a shared machine are noisy: the script prints the load average beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from services.bootstrap.pipeline import bootstrap
from services.bootstrap.recipe import PolicyRecipe
from services.core.boxes import Box
from services.evaluation.cli import evaluate
from services.evaluation.datasets import RecSample, read_spr_rec
from services.evaluation.rec import (
    AdapterResult,
    Prediction,
    accuracy_at,
    best_iou,
    chance_iou_of_random_box,
    format_table,
)
from services.policy.runner import PolicyRunner
from services.world.build import world_objects


def _floor(name: str, samples: list[RecSample], ious: Sequence[float]) -> AdapterResult:
    predictions = [Prediction(s.sample_id, "", None, float(v)) for s, v in zip(samples, ious, strict=True)]
    return AdapterResult(name, predictions)


def random_object_ious(world: Path, samples: list[RecSample], seed: int = 0) -> list[float]:
    """IoU of a uniformly chosen annotated object of the sample's image: REC's chance level."""
    coco = json.loads((world / "annotations.json").read_text())
    objects = world_objects(coco)
    image_of = {str(world / image["file_name"]): image["id"] for image in coco["images"]}
    rng = random.Random(seed)
    ious = []
    for sample in samples:
        guess = rng.choice(objects[image_of[sample.image_path]]).box
        ious.append(best_iou(Box(*(float(v) for v in guess)), sample.boxes))
    return ious


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=PolicyRecipe().steps)
    parser.add_argument("--batch-size", type=int, default=PolicyRecipe().batch_size)
    parser.add_argument("--lr", type=float, default=PolicyRecipe().learning_rate)
    parser.add_argument("--rec-share", type=float, default=PolicyRecipe().rec_share)
    parser.add_argument("--pos-std", type=float, default=PolicyRecipe().position_init_std)
    parser.add_argument("--sigma", type=float, default=PolicyRecipe().coordinate_sigma_bins)
    parser.add_argument("--digits", action="store_true", help="numbers as digit tokens (no number tokens)")
    parser.add_argument(
        "--number-init",
        action=argparse.BooleanOptionalAction,
        default=PolicyRecipe().number_init,
        help="number tokens' embeddings start from sin-cos codes of their value",
    )
    parser.add_argument("--patch", type=int, default=PolicyRecipe().patch_size)
    parser.add_argument("--images", type=int, default=PolicyRecipe().world_images)
    parser.add_argument("--eval", type=int, default=1000, help="held-out expressions to score (0: none)")
    parser.add_argument("--device", default="cpu", help="where to train")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--save-to", type=Path, help="also archive the policy folder here (.tar.gz)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = replace(
        PolicyRecipe(),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        rec_share=args.rec_share,
        position_init_std=args.pos_std,
        patch_size=args.patch,
        coordinate_sigma_bins=args.sigma,
        number_tokens=not args.digits,
        number_init=args.number_init and not args.digits,
        world_images=args.images,
        warmup_steps=min(PolicyRecipe().warmup_steps, max(args.steps // 10, 1)),
    )
    print(f"recipe {recipe}\nthreads {torch.get_num_threads()}, load average {os.getloadavg()}", flush=True)

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    built = bootstrap(recipe, args.cache, force=args.force, say=say, device=args.device)
    print(
        f"bootstrap: {built.seconds:.1f}s ({'cache hit' if built.from_cache else 'trained'}), {built.policy}"
    )
    print(f"  of which SFT: {built.manifest['train_seconds']}s for {recipe.steps} steps on {args.device}")
    hit = bootstrap(recipe, args.cache)
    print(f"cache hit: {hit.seconds * 1000:.1f} ms (from_cache={hit.from_cache})")
    if args.save_to:
        import shutil

        shutil.make_archive(str(args.save_to), "gztar", built.policy)
    if args.eval:
        samples = read_spr_rec(built.rec_test)[: args.eval]
        runner = PolicyRunner(str(built.policy), device="cpu")
        start = time.perf_counter()
        results = evaluate(runner, samples, batch_size=64)
        print(f"evaluated {len(samples)} expressions in {time.perf_counter() - start:.1f}s")
        chance = chance_iou_of_random_box(samples)
        floor = AdapterResult(
            "random box",
            [Prediction(s.sample_id, "", None, float(v)) for s, v in zip(samples, chance, strict=True)],
        )
        print(format_table([floor, *results]))
        for kind in ("attribute", "absolute", "relational"):
            ious = [
                p.iou
                for s, p in zip(samples, results[0].predictions, strict=True)
                if s.tags.get("kind") == kind
            ]
            if ious:
                print(f"  {kind:<11} n={len(ious):>4}  Acc@0.5 {accuracy_at(ious)[0.5]:.1f}")
        for p in results[0].predictions[:8]:
            print(f"  {p.sample_id}: {p.text!r} iou={p.iou:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
