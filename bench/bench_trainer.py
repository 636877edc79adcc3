"""Benchmark: trainer samples/s against a bare TRL `DPOTrainer` loop on the same data and model
(``python bench/bench_trainer.py [--pairs 32] [--steps 8] [--model PATH] [--device auto]``).

Both sides train the same LoRA for the same steps on the same dataset (built once by
`trainer.dataset.build_dataset`); the timed part is `trainer.train()` as TRL reports it
(`train_samples_per_second`), so model loading is excluded on both sides. Goal: ratio >= 0.9.
Peak memory: CUDA max allocated on a GPU, else the process's max RSS (which covers both runs).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
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


def _peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default="", help="policy folder/id (default: the tiny Qwen2.5-VL)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--lora-r", type=int, default=16)
    args = parser.parse_args()
    model = args.model or str(ensure_model("tiny-qwen2.5-vl"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = TrainerConfig(
            base_model=model,
            device=args.device,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            batch_size=4,
            max_steps=args.steps,
            heldout_fraction=0.0,
        )
        dataset = build_dataset(make_pairs(work / "img", args.pairs), get_family(cfg.model_family))
        empty = dataset.select([])
        bare = bare_trl(cfg, dataset, work / "bare")
        ours = train_round(cfg, dataset, empty, None, work / "ours").train_samples_per_second
    device = cfg.resolved_device()
    on_gpu = device.startswith("cuda")
    card = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"device {device} ({card}), bf16 {cfg.use_bf16()}")
    print(
        f"model {model}, {args.pairs} pairs, {args.steps} steps x batch {cfg.batch_size}, LoRA r {cfg.lora_r}"
    )
    print(f"bare TRL DPOTrainer : {bare:8.2f} samples/s")
    print(f"spr trainer recipe  : {ours:8.2f} samples/s")
    print(f"ratio               : {ours / bare:8.3f} (goal >= 0.9)")
    print(f"peak memory         : {_peak_mib(device):8.0f} MiB ({'CUDA allocated' if on_gpu else 'max RSS'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
