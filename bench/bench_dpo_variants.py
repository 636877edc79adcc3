"""Training recipes compared on the same pairs: which DPO settings move held-out REC, and by how much.

    python bench/bench_dpo_variants.py --run ~/.cache/spr/main \
        --variant 'lr 3e-4={"learning_rate": 3e-4}' --variant 'sft on chosen={"objective": "sft-chosen"}'

Takes a finished `spr-main --work RUN`: the pairs its base policy produced (lineage adapter version
"", read from a copy of the run's broker data) and its base answers on the held-out REC split
(`rec_results.json`). Each variant trains one round from the base with the trainer's own recipe
(`trainer.recipe.train_round`) at the main job's settings, overridden by the variant's
`TrainerConfig` fields; its adapter is merged into the policy (PEFT `merge_and_unload`) and answers the
same expressions, so every difference to the base and between variants is paired. Unlike
`bench_ablations.py`, nothing is re-sampled: only the training recipe differs. About 3 minutes per
variant on 2 CPU cores (one round of ~110 pairs, 1000 expressions).

`--rec-pairs N` trains on other pairs: the base policy answers N REC expressions of the world's
*training* split 8 times each (the describer's sampling: T 1.0, top-p 0.9), chosen = the answer with
the best IoU against the GT box (replaced by the GT box at IoU > 0.5, as SPR refines), rejected = the
worst, skipped under the margin δ = 0.05. That is the held-out task itself, on-policy and with GT-based
preferences: an upper bound on what a round of region descriptions can transfer to REC. With
`--rec-truth` the chosen answer is always the GT box: with the variant
`'sft={"objective": "sft-chosen", "learning_rate": 1e-3, "num_epochs": 1}'` that is supervised REC
training on N expressions, the most any round of N examples could teach the held-out task.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import PeftModel
from PIL import Image

from services.bootstrap.data import rec_examples
from services.bootstrap.pipeline import FORMAT, folder_for, is_complete
from services.describer.families import get_family
from services.devstack.broker import BrokerProcess
from services.evaluation.cli import evaluate_one, read_outputs
from services.evaluation.datasets import RecSample, read_spr_rec
from services.evaluation.prompts import rec_instruction
from services.evaluation.rec import AdapterResult, format_table, read_prediction
from services.loop.main_job import FAMILY, MainJobConfig, recipe_of
from services.modelzoo.loading import load_policy
from services.policy.runner import GenerationRequest, PolicyRunner, Sampling
from spr.v1 import common_pb2, describer_pb2, pairs_pb2
from trainer.config import TrainerConfig
from trainer.dataset import build_dataset, split_heldout
from trainer.recipe import train_round
from trainer.source import Batch, drain, open_consumer


def base_pairs(run: Path, scratch: Path) -> list[pairs_pb2.PreferencePair]:
    """The pairs of the run's base policy, from a copy of its broker data (the run stays untouched)."""
    data = scratch / "broker-data"
    shutil.copytree(run / "broker" / "data", data)
    with BrokerProcess("noida", workdir=scratch / "broker", data_dir=data) as broker:
        cfg = TrainerConfig(bootstrap_servers=broker.bootstrap_servers, group_id="bench-dpo-variants")
        consumer = open_consumer(cfg)
        try:
            pairs = drain(consumer, cfg, Batch()).pairs()
        finally:
            consumer.close()
    return [pair for pair in pairs if not pair.lineage.adapter_version]


def rec_pairs(
    policy: Path, count: int, always_truth: bool = False, delta: float = 0.05
) -> list[pairs_pb2.PreferencePair]:
    """On-policy REC pairs from `count` expressions of the world's training split (module docstring);
    ``always_truth``: the chosen answer is always the GT box."""
    samples = random.Random(0).sample(read_spr_rec(policy.parent / "world" / "rec_train.json"), count)
    images = {s.image_path: Image.open(s.image_path).convert("RGB") for s in samples}
    truth = {
        s.sample_id: e.answer for s, e in zip(samples, rec_examples(samples, FORMAT, images), strict=True)
    }
    runner, sampling = PolicyRunner(str(policy)), Sampling(num_samples=8, max_new_tokens=24, seed=1)
    pairs = []
    for start in range(0, count, 16):
        batch = samples[start : start + 16]
        requests = [
            GenerationRequest(images[s.image_path], rec_instruction(s.expression, FORMAT), sampling)
            for s in batch
        ]
        for sample, result in zip(batch, runner.generate(requests), strict=True):
            size = images[sample.image_path].size
            scored = sorted(
                (read_prediction(sample, text, FORMAT, size, size).iou, text) for text in result.texts
            )
            (worst, rejected), (best, chosen) = scored[0], scored[-1]
            if always_truth or best > 0.5:
                best, chosen = 1.0, truth[sample.sample_id]
            if best - worst >= delta and chosen != rejected:
                pairs.append(rec_pair(sample, size, (chosen, best), (rejected, worst)))
    return pairs


def rec_pair(
    sample: RecSample, size: tuple[int, int], chosen: tuple[str, float], rejected: tuple[str, float]
) -> pairs_pb2.PreferencePair:
    """A REC answer pair as the trainer reads pairs: the whole image is the region, IoU is S_loc."""
    width, height = size
    region = common_pb2.Region(
        region_id=sample.sample_id,
        image=common_pb2.ImageRef(uri=Path(sample.image_path).resolve().as_uri(), width=width, height=height),
        box=common_pb2.Box(x1=0, y1=0, x2=width, y2=height),
    )
    return pairs_pb2.PreferencePair(
        pair_id=f"rec-{sample.sample_id}",
        region_id=sample.sample_id,
        region=region,
        prompt=rec_instruction(sample.expression, FORMAT),
        prompt_mode=describer_pb2.PROMPT_MODE_FULL_IMAGE_BOX,
        chosen=pairs_pb2.ScoredText(text=chosen[0], reward=chosen[1], s_loc=chosen[1]),
        rejected=pairs_pb2.ScoredText(text=rejected[0], reward=rejected[1], s_loc=rejected[1]),
        margin=chosen[1] - rejected[1],
    )


def merged_policy(policy: Path, adapter: Path, out: Path) -> Path:
    """The policy with the round's LoRA merged in, saved with its processor."""
    model, processor = load_policy(str(policy), "cpu", "float32")
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(out)
    processor.save_pretrained(out)
    return out


def trainer_config(policy: Path, work: Path, overrides: dict[str, Any]) -> TrainerConfig:
    """The main job's round settings (`spr-main` defaults), then the variant's fields."""
    main = MainJobConfig()
    values: dict[str, Any] = {
        "base_model": str(policy),
        "model_family": FAMILY,
        "work_dir": str(work),
        "seed": 1,  # the main job's first round
        "learning_rate": main.dpo_learning_rate,
        "num_epochs": main.dpo_epochs,
    }
    return TrainerConfig(**(values | overrides))


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, fields = text.partition("=")
    overrides = json.loads(fields or "{}")
    if not name or not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError(f"expected NAME=JSON-OBJECT, got {text!r}")
    return name, overrides


def run_policy(run: Path) -> Path:
    """The base policy the run trained on, from its adapters' lineage (``baseModelId`` of their
    manifests), so that a run from another bootstrap recipe (``spr-main --bootstrap-steps 2000``) is
    compared with its own base; the default recipe's policy for a run that published nothing."""
    for manifest in sorted((run / "adapters" / "versions").glob("*/spr_manifest.json")):
        return Path(json.loads(manifest.read_text(encoding="utf-8"))["baseModelId"])
    return folder_for(recipe_of(MainJobConfig())) / "policy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=MainJobConfig().work, help="a finished spr-main --work")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], help="NAME=JSON")
    parser.add_argument("--out", type=Path, default=None, help="keep adapters here (default: a temp dir)")
    parser.add_argument("--rec-pairs", type=int, default=0, help="train on N on-policy REC pairs instead")
    parser.add_argument("--rec-truth", action="store_true", help="--rec-pairs: chosen = the GT box always")
    args = parser.parse_args()
    variants = args.variant or [("main-job defaults", {})]
    policy = run_policy(args.run)
    if not is_complete(policy.parent):
        raise SystemExit(f"no cached bootstrap policy at {policy}: run spr-main first")
    base = read_outputs(args.run / "rec_results.json")[0]
    samples = read_spr_rec(policy.parent / "world" / "rec_test.json")[: len(base.predictions)]
    if [s.sample_id for s in samples] != [p.sample_id for p in base.predictions]:
        raise SystemExit("the run's base answers are not on this bootstrap's REC split")
    scratch = Path(tempfile.mkdtemp(prefix="bench-dpo-")) if args.out is None else args.out
    if args.rec_pairs:
        pairs = rec_pairs(policy, args.rec_pairs, args.rec_truth)
    else:
        pairs = base_pairs(args.run, scratch)
    train, heldout = split_heldout(build_dataset(pairs, get_family(FAMILY)), TrainerConfig().heldout_fraction)
    source = "on-policy REC" if args.rec_pairs else "base"
    print(f"{len(pairs)} {source} pairs: {len(train)} train, {len(heldout)} held out", flush=True)
    results: list[AdapterResult] = [base]
    for name, overrides in variants:
        work = scratch / name.replace(" ", "_")
        round_ = train_round(trainer_config(policy, work, overrides), train, heldout, None, work)
        held = {k: round_.metrics.get(f"eval_reward_{k}", math.nan) for k in ("margin", "chosen", "rejected")}
        print(f"{name}: held-out reward " + ", ".join(f"{k} {v:+.3f}" for k, v in held.items()), flush=True)
        merged = merged_policy(policy, round_.adapter_dir, work / "merged")
        results.append(evaluate_one(PolicyRunner(str(merged)), samples, "", name))
    print("\n" + format_table(results))


if __name__ == "__main__":
    main()
