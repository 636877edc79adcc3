"""Sweep bootstrap recipes on a GPU: REC Acc@0.5 of the bootstrapped policy against steps and knobs.

The CPU bootstrap costs ~0.9 s a step, so the recipe that the main job can afford is found here, where
a step costs milliseconds: every variant trains from scratch with the production code
(`services.bootstrap`) and is scored by the production evaluator on held-out and on training
expressions (under- or over-fitting). Variants run as parallel processes on one GPU; each writes
`$OUT/sweep-<name>.json` when done, so a timeout still leaves the finished ones.

    python bench/gpu/bootstrap_sweep.py --world /tmp/world --out $OUT            # the driver
    python bench/gpu/bootstrap_sweep.py --world /tmp/world --out $OUT --variant d750
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from services.bootstrap.pipeline import train_policy
from services.bootstrap.recipe import PolicyRecipe
from services.evaluation.cli import evaluate_one
from services.evaluation.datasets import read_spr_rec
from services.evaluation.rec import accuracy_at
from services.policy.adapters import BASE
from services.policy.runner import PolicyRunner
from services.world.build import SPLITS, WorldFiles, build_world
from services.world.scenes import SceneConfig

DEFAULT = PolicyRecipe()
VARIANTS: dict[str, dict[str, Any]] = {
    "d750": {"steps": 750},
    "d3000": {"steps": 3000},
    "d6000": {"steps": 6000},
    "b16_2250": {"steps": 2250, "batch_size": 16},
    "p8_3000": {"steps": 3000, "patch_size": 8},
    "wide_3000": {"steps": 3000, "vision_width": 192, "text_width": 256},
    "ni_3000": {"steps": 3000, "number_init": True},
    "rec_3000": {"steps": 3000, "rec_share": 1.0},
}


def run_variant(name: str, world_dir: Path, out: Path, device: str, eval_n: int, max_steps: int) -> None:
    recipe = replace(DEFAULT, **VARIANTS[name])
    if max_steps:
        recipe = replace(recipe, steps=min(recipe.steps, max_steps), warmup_steps=1)
    world = WorldFiles(world_dir / "annotations.json", {s: world_dir / f"rec_{s}.json" for s in SPLITS})
    started = time.time()
    say = lambda line: print(f"{name} {time.time() - started:.0f}s {line}", flush=True)  # noqa: E731
    model, processor, log = train_policy(recipe, world, say, device, log_every=250)
    folder = out / f"policy-{name}"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    runner = PolicyRunner(str(folder), device=device)
    result: dict[str, Any] = {"name": name, "recipe": asdict(recipe), "train_s": round(log.seconds, 1)}
    result["losses"] = log.losses
    for split in ("test", "train"):
        samples = read_spr_rec(world.rec[split])[:eval_n]
        scored = evaluate_one(runner, samples, BASE, f"{name}-{split}", batch_size=250, max_new_tokens=24)
        result[f"acc_{split}"] = accuracy_at(scored.ious())
        result[f"sample_answers_{split}"] = [p.text for p in scored.predictions[:5]]
    (out / f"sweep-{name}.json").write_text(json.dumps(result, indent=1))


def drive(args: argparse.Namespace) -> None:
    """Build the world once, then train and score every variant in its own process, in parallel."""
    started = time.time()
    scenes = SceneConfig(max_objects=DEFAULT.world_max_objects)
    build_world(args.world, DEFAULT.world_images, DEFAULT.world_seed, scenes, DEFAULT.test_fraction)
    print(f"world built in {time.time() - started:.0f}s", flush=True)
    common = ["--world", str(args.world), "--out", str(args.out), "--device", args.device]
    common += ["--eval", str(args.eval), "--max-steps", str(args.max_steps)]
    procs = {}
    for name in args.only:
        with open(args.out / f"sweep-{name}.log", "w") as log:
            command = [sys.executable, __file__, *common, "--variant", name]
            procs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = args.deadline
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(deadline - (time.time() - started), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
        print(f"{name}: rc {proc.wait()} at {time.time() - started:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval", type=int, default=1000)
    parser.add_argument("--deadline", type=float, default=1e9, help="kill unfinished variants after this (s)")
    parser.add_argument("--max-steps", type=int, default=0, help="cap every variant (smoke runs)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        torch.set_num_threads(1)
        run_variant(args.variant, args.world, args.out, args.device, args.eval, args.max_steps)
    else:
        drive(args)


if __name__ == "__main__":
    main()
