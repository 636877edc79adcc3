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
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import PeftModel

from services.bootstrap.pipeline import folder_for, is_complete
from services.describer.families import get_family
from services.devstack.broker import BrokerProcess
from services.evaluation.cli import evaluate_one, read_outputs
from services.evaluation.datasets import read_spr_rec
from services.evaluation.rec import AdapterResult, format_table
from services.loop.main_job import FAMILY, MainJobConfig, recipe_of
from services.modelzoo.loading import load_policy
from services.policy.runner import PolicyRunner
from spr.v1 import pairs_pb2
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=MainJobConfig().work, help="a finished spr-main --work")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], help="NAME=JSON")
    parser.add_argument("--out", type=Path, default=None, help="keep adapters here (default: a temp dir)")
    args = parser.parse_args()
    variants = args.variant or [("main-job defaults", {})]
    policy = folder_for(recipe_of(MainJobConfig())) / "policy"
    if not is_complete(policy.parent):
        raise SystemExit(f"no cached bootstrap policy at {policy}: run spr-main first")
    base = read_outputs(args.run / "rec_results.json")[0]
    samples = read_spr_rec(policy.parent / "world" / "rec_test.json")[: len(base.predictions)]
    if [s.sample_id for s in samples] != [p.sample_id for p in base.predictions]:
        raise SystemExit("the run's base answers are not on this bootstrap's REC split")
    scratch = Path(tempfile.mkdtemp(prefix="bench-dpo-")) if args.out is None else args.out
    pairs = base_pairs(args.run, scratch)
    train, heldout = split_heldout(build_dataset(pairs, get_family(FAMILY)), TrainerConfig().heldout_fraction)
    print(f"{len(pairs)} base pairs: {len(train)} train, {len(heldout)} held out", flush=True)
    results: list[AdapterResult] = [base]
    for name, overrides in variants:
        work = scratch / name.replace(" ", "_")
        round_ = train_round(trainer_config(policy, work, overrides), train, heldout, None, work)
        margin = round_.metrics.get("eval_reward_margin", float("nan"))
        print(f"{name}: held-out reward margin {margin:.3f}", flush=True)
        merged = merged_policy(policy, round_.adapter_dir, work / "merged")
        results.append(evaluate_one(PolicyRunner(str(merged)), samples, "", name))
    print("\n" + format_table(results))


if __name__ == "__main__":
    main()
