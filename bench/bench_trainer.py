"""Benchmark: trainer samples/s against a bare TRL `DPOTrainer` loop on the same data and model
(``python bench/bench_trainer.py [--pairs 32] [--steps 8] [--model PATH] [--device auto]``).

Both sides train the same LoRA for the same steps on the same dataset (built once by
`trainer.dataset.build_dataset`); the timed part is `trainer.train()` as TRL reports it
(`train_samples_per_second`), so model loading is excluded on both sides. Goal: ratio >= 0.9.
``--warmup`` first trains 2 untimed steps so that one-time costs (CUDA context, kernel selection, the
allocator's first growth) land on neither side; with ``--repeats N`` the sides alternate N times
(bare, ours, bare, ours, ...) and the medians are compared.
Peak memory: per side, CUDA max allocated on a GPU (reset before each run); on CPU the process's max
RSS, which covers both sides. ``--json FILE`` also writes the figures as JSON.
`bench/gpu/run_trainer_gpu.sh` runs this on a GPU with a ~1B real-architecture Qwen2.5-VL in bf16.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from trl.trainer.dpo_trainer import DPOTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.describer.families import get_family  # noqa: E402
from services.modelzoo.loading import load_policy  # noqa: E402
from services.modelzoo.tiny import ensure_model  # noqa: E402
from tests.trainer.conftest import make_pairs  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402
from trainer.dataset import build_dataset  # noqa: E402
from trainer.recipe import dpo_config, lora_config, train_round  # noqa: E402


def bare_trl(cfg: TrainerConfig, dataset: Any, out: Path) -> float:
    """The reference: load, DPOTrainer with a LoRA config, train; nothing else."""
    model, processor = load_policy(
        cfg.base_model, cfg.resolved_device(), "bfloat16" if cfg.use_bf16() else None
    )
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(cfg, out),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(cfg),
    )
    return float(trainer.train().metrics["train_samples_per_second"])


def ours(cfg: TrainerConfig, dataset: Any, out: Path) -> float:
    """The trainer's recipe (`trainer.recipe.train_round`), no held-out evaluation."""
    return train_round(cfg, dataset, dataset.select([]), None, out).train_samples_per_second


def measured(
    run: Callable[[TrainerConfig, Any, Path], float], cfg: TrainerConfig, dataset: Any, out: Path
) -> tuple[float, float]:
    """(samples/s, peak MiB) of one run; CUDA peaks are per run, CPU max RSS is per process."""
    on_gpu = cfg.resolved_device().startswith("cuda")
    if on_gpu:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    speed = run(cfg, dataset, out)
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gc.collect()
    return speed, peak


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--model", default="", help="policy folder/id (default: the tiny Qwen2.5-VL)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--image-size", default="64x48", help="synthetic image WxH")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per side")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    parser.add_argument("--warmup", action="store_true", help="2 untimed training steps first")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    model = args.model or str(ensure_model("tiny-qwen2.5-vl"))
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = TrainerConfig(
            base_model=model,
            device=args.device,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            batch_size=args.batch_size,
            max_steps=args.steps,
            heldout_fraction=0.0,
        )
        started = time.monotonic()
        pairs = make_pairs(work / "img", args.pairs, size=(width, height))
        dataset = build_dataset(pairs, get_family(cfg.model_family))
        build_s = time.monotonic() - started
        if args.warmup:
            ours(replace(cfg, max_steps=2), dataset, work / "warmup")
        runs: dict[str, list[tuple[float, float]]] = {"bare": [], "ours": []}
        for i in range(args.repeats):
            runs["bare"].append(measured(bare_trl, cfg, dataset, work / f"bare-{i}"))
            runs["ours"].append(measured(ours, cfg, dataset, work / f"ours-{i}"))
    report(args, cfg, model, build_s, runs)
    return 0


def report(
    args: argparse.Namespace,
    cfg: TrainerConfig,
    model: str,
    build_s: float,
    runs: dict[str, list[tuple[float, float]]],
) -> None:
    device = cfg.resolved_device()
    on_gpu = device.startswith("cuda")
    bare = statistics.median(speed for speed, _ in runs["bare"])
    mine = statistics.median(speed for speed, _ in runs["ours"])
    peaks = {side: max(peak for _, peak in results) for side, results in runs.items()}
    figures = {
        "device": device,
        "card": torch.cuda.get_device_name() if on_gpu else "cpu",
        "bf16": cfg.use_bf16(),
        "model": model,
        "pairs": args.pairs,
        "steps": args.steps,
        "batch_size": cfg.batch_size,
        "lora_r": cfg.lora_r,
        "image_size": args.image_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "dataset_build_s": round(build_s, 2),
        "bare_samples_per_s": [round(s, 3) for s, _ in runs["bare"]],
        "ours_samples_per_s": [round(s, 3) for s, _ in runs["ours"]],
        "ratio": round(mine / bare, 4),
        "peak_mib": {side: round(peak) for side, peak in peaks.items()},
        "peak_kind": "CUDA max allocated" if on_gpu else "max RSS (process)",
        "torch": torch.__version__,
    }
    print(f"device {device} ({figures['card']}), bf16 {cfg.use_bf16()}, torch {torch.__version__}")
    print(
        f"model {model}, {args.pairs} pairs of {args.image_size} images (built in {build_s:.1f}s), "
        f"{args.steps} steps x batch {cfg.batch_size}, LoRA r {cfg.lora_r}, {args.repeats} run(s) per side"
    )
    print(f"bare TRL DPOTrainer : {bare:8.2f} samples/s (median), peak {peaks['bare']:8.0f} MiB")
    print(f"spr trainer recipe  : {mine:8.2f} samples/s (median), peak {peaks['ours']:8.0f} MiB")
    print(f"ratio               : {mine / bare:8.3f} (goal >= 0.9)")
    print(f"peak memory         : {figures['peak_kind']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
