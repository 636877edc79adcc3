"""`spr-main`: the whole SPR loop on one machine, for R rounds, with a REC evaluation of every adapter.

    world + bootstrap policy + world grounder (cached)  ->  broker, tritonserver (policy + adapter follower)
    -> sampler -> `regions` -> describer stage -> `descriptions`
    -> localization stage (the world's OWLv2 grounds each phrase) ∥ semantic stage (MiniLM)
    -> pair builder -> `pairs` -> trainer (one DPO round, publish, announce) -> serving hot-loads `latest`
    -> REC evaluation of the new version on the held-out split -> next round samples from it

Every stage is its own process started with the same command and environment variables a Kubernetes
Deployment uses (:mod:`services.loop.stack`). Each round samples new regions (the sampler resumes its
seeded sequence), waits until every one of them has exactly one decision on `pairs`, trains one round on
the pairs the trainer has not consumed yet, and waits until Triton serves the new version as `latest`
before the next round samples. The base and every version are evaluated on the same held-out
expressions, so the differences get paired bootstrap confidence intervals.

Outputs in ``--work``: ``report.md`` (the table), ``rec_accuracy.png``, ``rec_results.json``,
``metrics.prom`` (Prometheus text format: the Grafana dashboard's REC panels read these series through
a textfile collector) and the logs of every service under ``logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from services.adapters.store import AdapterStore
from services.bootstrap.grounder import GrounderRecipe
from services.bootstrap.pipeline import Bootstrapped, bootstrap, bootstrap_grounder, world_files
from services.bootstrap.recipe import PolicyRecipe
from services.common.kafka_io import KafkaSettings, Topic, ensure_topics
from services.common.topics import (
    DESCRIPTIONS,
    PAIRS,
    REGIONS,
    SCORES_LOCALIZATION,
    SCORES_SEMANTIC,
    adapters_topic,
    dead_letter_topic,
    stream_topics,
)
from services.core.refine import REFINE_IOU_THRESHOLD
from services.describer.families import parse_prompt_kinds
from services.devstack.broker import BrokerProcess
from services.devstack.process import wait_until
from services.devstack.triton import TritonServer
from services.evaluation.cli import evaluate_one, write_outputs
from services.evaluation.datasets import RecSample, read_spr_rec
from services.evaluation.described_boxes import (
    BOX_THRESHOLDS,
    VersionBoxes,
    box_statistics,
    described_box_ious,
    format_box_table,
)
from services.evaluation.rec import THRESHOLDS, AdapterResult, accuracy_at, format_table, paired_bootstrap
from services.loop.stack import (
    DecisionLedger,
    Pipeline,
    ServiceSet,
    read_messages,
    service_set,
    wait_for_decisions,
)
from services.policy.runner import PolicyRunner
from services.world.build import split_image_ids
from spr.v1 import pairs_pb2

POLICY_REPOSITORY = Path(__file__).resolve().parents[1] / "policy" / "model_repository"
FAMILY = "ferret"  # the bootstrap policy is a LLaVA/Ferret-architecture model writing [x1,y1,x2,y2] in 0-999


@dataclass(frozen=True)
class MainJobConfig:
    """Knobs of one main-job run; the defaults are the full benchmark run."""

    work: Path = field(default_factory=lambda: Path.home() / ".cache" / "spr" / "main")
    rounds: int = 2
    # Measured on 2 CPU cores (2026-11-28, quiet machine, README): a round decides its 120 regions in
    # ~1.5 min (8 samples, every phrase grounded by the world OWLv2), trains DPO in ~2.4 min and serves
    # and evaluates 1000 expressions in ~0.9 min: 9.9 min from a cached bootstrap, 24.6 from an empty
    # cache (the bootstrap adds ~14.7). Another machine of this kind took 14.4 and 36.5, so the default
    # keeps that much headroom under the 15- and 30-minute goals.
    regions_per_round: int = 120
    samples: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 40
    lambda_sem: float = 0.8
    delta: float = 0.05
    refine_iou: float = REFINE_IOU_THRESHOLD  # see --refine-iou
    # The describer's prompt modes, one per region by its id: the two the bootstrap teaches
    # (`services.bootstrap.data`); crop-refs is out of domain for the world policy. Measured 2026-11-28
    # (cached bootstrap, 240 regions): "full-box" alone, whose boxes are in the whole image's frame as
    # REC answers are, moved REC no more than the mix (Acc@0.5 -0.1 [-1.6, +1.4]).
    prompt_modes: str = "crop,full-box"
    eval_limit: int = 1000
    # Tansu, not noida-db: noida answers an empty fetch at once instead of holding it for
    # fetch.max.wait.ms (services.devstack.broker), so the four stages, idle while a round trains and
    # evaluates, spun at ~0.3 of a core each and took the two cores from the trainer. Measured
    # 2026-11-29 on the cached bootstrap, default run: a round's 54 DPO steps 106 s -> 36 s, a REC
    # evaluation 54 s -> 19 s, the whole run 10.3 -> 5.5 min. `--broker noida` still runs on noida.
    broker: str = "tansu"
    run_id: str = "main"
    bootstrap_steps: int = 0  # 0 = the recipe's
    bootstrap_images: int = 0  # 0 = the recipe's
    bootstrap_vision_steps: int = -1  # the vision tower's pretraining steps (-1 = the recipe's, 0 = none)
    bootstrap_box_slack: float = -1.0  # how loose the SFT answers' boxes are (-1 = the recipe's, 0 = exact)
    bootstrap_coordinate_sigma: float = -1.0  # SFT soft labels' width in bins (-1 = the recipe's, 0 = hard)
    bootstrap_batch_size: int = 0  # SFT examples per step (0 = the recipe's)
    bootstrap_rec_names_object: bool | None = None  # REC answers name the target first (None = the recipe's)
    # Who grounds the described phrases for S_loc: "world", the OWLv2 grounder trained on the world with
    # the bootstrap (`services.bootstrap.grounder`), as SPR uses a detector that localizes better than the
    # policy; or "policy", the policy itself through Triton (then S_loc only measures self-agreement).
    grounder: str = "world"
    grounder_steps: int = 0  # the world grounder's training steps (0 = its recipe's)
    # DPO for this from-scratch policy (SFT ran at 1e-3): the paper's 1e-5 for 7B models left the adapter
    # near the base (reward margin 0.006 after a round). Larger steps make it forget REC, which no round
    # trains. One round on a default run's 119 base pairs (2026-11-28, the same pairs each time, answers
    # closed by EOS as `trainer.recipe.closed_answers` does; Acc@0.5 vs the base over 1000 held-out
    # expressions): 3e-4 -3.3 [-5.2, -1.5] (held-out reward margin 0.25), 1e-4 -0.8 [-2.6, +0.9]
    # (margin 0.12), but -3.0 [-4.8, -1.2] on another run's pairs; SFT on the chosen texts at 3e-4 -1.8,
    # pure DPO without the NLL term -8.6 (`bench/bench_dpo_variants.py`). No setting that moves the
    # adapter measurably has left REC where it was.
    # `--trainer-arg` still overrides both.
    dpo_learning_rate: float = 1e-4
    dpo_epochs: float = 2.0
    trainer_args: tuple[str, ...] = ()
    round_timeout_s: float = 1200.0
    # Math threads of every process once the stack runs: Triton's policy, each stage, the trainer and
    # this process's REC evaluations. ~6 processes share the cores, and with torch's default (a thread
    # per core each) they stalled on each other's OpenMP barriers: on 2 cores a batch of generations
    # took 10x longer, a DPO step 8x, a REC evaluation with an adapter 25x. The bootstrap runs alone,
    # before the stack, with every core.
    service_threads: int = 1


def say(message: str) -> None:
    print(f"[spr-main {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- preparation ------------------------------------------------------------------------------------


def recipe_of(cfg: MainJobConfig) -> PolicyRecipe:
    recipe = PolicyRecipe()
    if cfg.bootstrap_steps:
        recipe = replace(recipe, steps=cfg.bootstrap_steps)
    if cfg.bootstrap_images:
        recipe = replace(recipe, world_images=cfg.bootstrap_images)
    if cfg.bootstrap_vision_steps >= 0:
        recipe = replace(recipe, vision_pretrain_steps=cfg.bootstrap_vision_steps)
    if cfg.bootstrap_box_slack >= 0:
        recipe = replace(recipe, box_label_slack=cfg.bootstrap_box_slack)
    if cfg.bootstrap_batch_size:
        recipe = replace(recipe, batch_size=cfg.bootstrap_batch_size)
    if cfg.bootstrap_coordinate_sigma >= 0:
        recipe = replace(recipe, coordinate_sigma_bins=cfg.bootstrap_coordinate_sigma)
    if cfg.bootstrap_rec_names_object is not None:
        recipe = replace(recipe, rec_answer_names_object=cfg.bootstrap_rec_names_object)
    return recipe


def prepare(recipe: PolicyRecipe) -> Bootstrapped:
    boot = bootstrap(recipe, say=say)
    origin = "cache" if boot.from_cache else "trained now"
    say(f"bootstrap policy ({origin}, {boot.seconds:.0f}s): {boot.policy}")
    return boot


def prepare_grounder(cfg: MainJobConfig, boot: Bootstrapped) -> Path | None:
    """The world grounder's folder (trained on the bootstrap's world, cached); None: the policy grounds."""
    if cfg.grounder == "policy":
        return None
    recipe = GrounderRecipe()
    if cfg.grounder_steps:
        recipe = replace(recipe, steps=cfg.grounder_steps)
    folder, hit, manifest = bootstrap_grounder(recipe, world_files(boot), say=say)
    origin = "cache" if hit else "trained now"
    accuracy = manifest["grounding_acc50"]
    say(f"world grounder ({origin}; held-out grounding Acc@0.5 {accuracy:.1%}): {folder}")
    return folder


def training_annotations(boot: Bootstrapped, recipe: PolicyRecipe, out: Path) -> Path:
    """The world's COCO file without the held-out REC images: SPR never samples a test image."""
    coco = json.loads((boot.world / "annotations.json").read_text())
    held_out = split_image_ids(coco, recipe.test_fraction)["test"]
    # absolute file names: the copy lives outside the world folder its names are relative to
    images = [
        {**i, "file_name": str((boot.world / i["file_name"]).resolve())}
        for i in coco["images"]
        if i["id"] not in held_out
    ]
    kept = {i["id"] for i in images}
    coco = {
        **coco,
        "images": images,
        "annotations": [a for a in coco["annotations"] if a["image_id"] in kept],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(coco))
    return out


# --- the stack --------------------------------------------------------------------------------------


def pipeline_of(cfg: MainJobConfig, policy: Path, grounder: Path | None) -> Pipeline:
    """The main job's pipeline: the world grounder (or the policy) grounds phrases, MiniLM judges text."""
    return Pipeline(
        policy=policy,
        family=FAMILY,
        run_id=cfg.run_id,
        samples=cfg.samples,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        prompt_modes=cfg.prompt_modes,
        lambda_sem=cfg.lambda_sem,
        delta=cfg.delta,
        refine_iou=cfg.refine_iou,
        localization_backend=localization_backend(grounder),
        semantic_backend={"BACKEND": "minilm"},
    )


def localization_backend(grounder: Path | None) -> dict[str, str]:
    """The localization stage's settings: the world grounder on PyTorch, else the policy via Triton."""
    cap = {"MAX_PHRASES_PER_CANDIDATE": "8"}  # garbage text yields many phrases
    if grounder is not None:
        return {"BACKEND": "torch", "MODEL": str(grounder), **cap}
    # a REC answer is one box (about ten tokens)
    return {"BACKEND": "mllm", "MLLM__MAX_NEW_TOKENS": "16", **cap}


# --- one round --------------------------------------------------------------------------------------


def sample_and_wait(
    cfg: MainJobConfig,
    pipeline: Pipeline,
    services: ServiceSet,
    kafka: KafkaSettings,
    dataset: Path,
    total: int,
) -> dict[str, int]:
    """Sample regions up to ``total`` in all, then wait until each has exactly one decision."""
    services.add(pipeline.sampler_spec(kafka, dataset, total))

    def progress(decided: int, sampled: int, ledger: DecisionLedger) -> None:
        pairs, again = len(ledger.pair_ids()), ledger.duplicates()
        say(f"decided {decided}/{sampled} regions (pairs {pairs}, re-deliveries {again})")

    ledger, _ = wait_for_decisions(
        kafka, services, cfg.run_id, timeout=cfg.round_timeout_s, on_progress=progress
    )
    return outcome_counts(ledger)


def outcome_counts(ledger: DecisionLedger) -> dict[str, int]:
    """Decisions by outcome: ``pair`` or the skip reason."""
    counts: dict[str, int] = {}
    for decisions in ledger.by_region.values():
        first = decisions[0]
        kind = "pair" if first.HasField("pair") else pairs_pb2.SkipReason.Name(first.skip)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def train_round(
    cfg: MainJobConfig, kafka: KafkaSettings, policy: Path, store: Path, round_no: int
) -> dict[str, Any]:
    """One `spr-trainer once` process; returns its run report (``outcome``, ``version``, metrics)."""
    argv = [
        sys.executable, "-m", "trainer", "once",
        "--base_model", str(policy),
        "--model_family", FAMILY,
        "--store", str(store),
        "--work_dir", str(cfg.work / "trainer"),
        "--bootstrap_servers", kafka.bootstrap_servers,
        "--seed", str(round_no),
        "--learning_rate", str(cfg.dpo_learning_rate),
        "--num_epochs", str(cfg.dpo_epochs),
        *cfg.trainer_args,
    ]  # fmt: skip
    if kafka.api_version:
        argv += ["--kafka_api_version", ".".join(str(p) for p in kafka.api_version)]
    log = cfg.work / "logs" / f"trainer-round{round_no}.log"
    with log.open("w") as out:  # the environment caps its threads (MainJobConfig.service_threads)
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=out, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"trainer round {round_no} failed (status {done.returncode}); log {log}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def serving_alias(triton: TritonServer, alias: str) -> str:
    """The version Triton's policy serves as ``alias`` (from its custom metrics), '' if none."""
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if (
            line.startswith("spr_policy_adapter_alias{")
            and f'alias="{alias}"' in line
            and line.endswith(" 1")
        ):
            return str(line.split('version="', 1)[1].split('"', 1)[0])
    return ""


# --- evaluation -------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    samples: list[RecSample]
    runner: PolicyRunner
    results: list[AdapterResult] = field(default_factory=list)

    def add(self, adapter: str, name: str) -> AdapterResult:
        result = evaluate_one(self.runner, self.samples, adapter, name)
        self.results.append(result)
        accuracy = accuracy_at(result.ious())
        say(f"REC {name}: " + "  ".join(f"Acc@{t:g} {accuracy[t]:.1f}" for t in THRESHOLDS))
        return result


def prometheus_text(results: Sequence[AdapterResult]) -> str:
    lines = [
        "# HELP spr_rec_accuracy REC accuracy (percent) of an adapter version at an IoU threshold.",
        "# TYPE spr_rec_accuracy gauge",
    ]
    for result in results:
        for t, value in accuracy_at(result.ious()).items():
            lines.append(f'spr_rec_accuracy{{adapter="{result.name}",iou="{t:g}"}} {value:.4f}')
    if len(results) > 1:
        lines += [
            "# HELP spr_rec_accuracy_gain Acc difference to the base.",
            "# TYPE spr_rec_accuracy_gain gauge",
        ]
        for result in results[1:]:
            for ci in paired_bootstrap(results[0].ious(), result.ious()):
                labels = f'adapter="{result.name}",iou="{ci.threshold:g}"'
                lines.append(f"spr_rec_accuracy_gain{{{labels}}} {ci.difference:.4f}")
    return "\n".join(lines) + "\n"


# --- the job ----------------------------------------------------------------------------------------


@dataclass
class Loop:
    """What the rounds share: the running stack, the policy, the adapter store and the evaluation."""

    cfg: MainJobConfig
    pipeline: Pipeline
    services: ServiceSet
    kafka: KafkaSettings
    triton: TritonServer
    dataset: Path
    store: Path
    evaluation: Evaluation

    def round(self, round_no: int) -> None:
        cfg = self.cfg
        say(f"round {round_no}/{cfg.rounds}: sampling {cfg.regions_per_round} regions")
        total = round_no * cfg.regions_per_round
        counts = sample_and_wait(cfg, self.pipeline, self.services, self.kafka, self.dataset, total)
        say(f"round {round_no}: decisions so far {counts}")
        report = train_round(cfg, self.kafka, self.pipeline.policy, self.store, round_no)
        version = str(report.get("version") or "")
        if not version:  # e.g. fewer pairs than the trainer's min_pairs: the next round samples more
            say(f"round {round_no}: nothing published ({report['outcome']}, {report['pair_count']} pairs)")
            return
        say(
            f"round {round_no}: trained on {report['pair_count']} pairs, published {version}"
            f" (promoted to stable: {report['promoted']}); waiting for serving to load it"
        )
        if not wait_until(lambda: serving_alias(self.triton, "latest") == version, timeout=120, interval=1.0):
            raise TimeoutError(f"serving did not switch `latest` to {version}")
        self.evaluation.add(version, f"round {round_no} ({version})")


def run(cfg: MainJobConfig) -> int:
    started = time.monotonic()
    (cfg.work / "logs").mkdir(parents=True, exist_ok=True)
    recipe = recipe_of(cfg)
    boot = prepare(recipe)
    grounder = prepare_grounder(cfg, boot)
    dataset = training_annotations(boot, recipe, cfg.work / "train_annotations.json")
    store = cfg.work / "adapters"
    samples = read_spr_rec(boot.rec_test)[: cfg.eval_limit or None]
    if cfg.service_threads > 0:
        torch.set_num_threads(cfg.service_threads)
    evaluation = Evaluation(samples, PolicyRunner(str(boot.policy), adapter_store=AdapterStore(store)))
    evaluation.add("", "base")
    with BrokerProcess(cfg.broker, workdir=cfg.work / "broker") as broker:
        kafka = broker.settings()
        ensure_topics(kafka, all_topics())
        say(f"broker ({cfg.broker}) at {broker.bootstrap_servers}")
        policy_env = policy_serving_env(boot.policy, store, kafka) | thread_env(cfg.service_threads)
        with (
            environment(policy_env),
            TritonServer(POLICY_REPOSITORY, workdir=cfg.work / "triton", models=["spr_policy"]) as triton,
            service_set(cfg.work / "logs") as services,
        ):
            say(f"tritonserver ready at {triton.grpc_url}")
            pipeline = pipeline_of(cfg, boot.policy, grounder)
            for spec in pipeline.stage_specs(kafka, triton.grpc_url):
                services.add(spec)
            say(f"stages started: {', '.join(services.names)}")
            loop = Loop(cfg, pipeline, services, kafka, triton, dataset, store, evaluation)
            for round_no in range(1, cfg.rounds + 1):
                loop.round(round_no)
        boxes = described_boxes(kafka, cfg.run_id)
    report(cfg, evaluation.results, boxes, time.monotonic() - started)
    return 0


def policy_serving_env(policy: Path, store: Path, kafka: KafkaSettings) -> dict[str, str]:
    """What the Triton policy model reads (services/policy/model_repository): the base and the follower."""
    return {
        "SPR_POLICY_MODEL_PATH": str(policy),
        "SPR_POLICY_BASE_MODEL_ID": str(policy),
        "SPR_POLICY_ADAPTER_STORE": str(store),
        "SPR_POLICY_KAFKA_BOOTSTRAP": kafka.bootstrap_servers,
        "SPR_POLICY_KAFKA_API_VERSION": ".".join(str(p) for p in kafka.api_version or ()),
    }


#: What sizes the math thread pools of torch, onnxruntime's default and the BLAS libraries.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_env(threads: int) -> dict[str, str]:
    """Environment capping a process's math threads (0: leave the libraries' defaults)."""
    return {name: str(threads) for name in THREAD_VARIABLES} if threads > 0 else {}


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` (tritonserver inherits them) while the block runs, restored after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def all_topics() -> list[Topic[Any]]:
    """The stream topics, their dead-letter topics and the compacted `adapters`."""
    sources = (REGIONS, DESCRIPTIONS, SCORES_LOCALIZATION, SCORES_SEMANTIC, PAIRS)
    return [*stream_topics().values(), *(dead_letter_topic(t) for t in sources), adapters_topic()]


def box_prometheus_text(boxes: Sequence[VersionBoxes]) -> str:
    """The described-box table as gauges: mean best IoU and percent of boxes per threshold, by version."""
    statistics = [(version.version, box_statistics(version.sums())) for version in boxes]
    lines = [
        "# HELP spr_described_box_iou Mean best GT IoU of the boxes in an adapter version's descriptions.",
        "# TYPE spr_described_box_iou gauge",
        *(f'spr_described_box_iou{{adapter="{name}"}} {stats[0]:.4f}' for name, stats in statistics),
        "# HELP spr_described_box_share Percent of those boxes at or above an IoU threshold.",
        "# TYPE spr_described_box_share gauge",
    ]
    for name, stats in statistics:
        for t, share in zip(BOX_THRESHOLDS, stats[1:], strict=True):
            lines.append(f'spr_described_box_share{{adapter="{name}",iou="{t:g}"}} {share:.4f}')
    return "\n".join(lines) + "\n"


def described_boxes(kafka: KafkaSettings, run_id: str) -> list[VersionBoxes]:
    """The box quality of this run's streamed descriptions, per adapter version (what SPR rewards)."""
    records = read_messages(kafka, stream_topics()[DESCRIPTIONS])
    return described_box_ious(r for r in records if r.lineage.run_id == run_id)


def report(
    cfg: MainJobConfig, results: Sequence[AdapterResult], boxes: Sequence[VersionBoxes], seconds: float
) -> None:
    table = format_table(results)
    if boxes:  # in-distribution: the boxes of the descriptions each version streamed (not held out)
        table += "\n\n" + format_box_table(boxes)
    png, path = write_outputs(
        results, cfg.work, f"REC on the held-out split (n={len(results[0].predictions)})"
    )
    (cfg.work / "metrics.prom").write_text(prometheus_text(results) + box_prometheus_text(boxes))
    (cfg.work / "report.md").write_text(f"```\n{table}\n```\n")
    print("\n" + table)
    print(
        f"\nplot {png}\nresults {path}\nmetrics {cfg.work / 'metrics.prom'}\nwall time {seconds / 60:.1f} min"
    )


def prompt_modes(text: str) -> str:
    """``--prompt-modes``: a comma-separated list of the describer's prompt modes, checked here rather
    than by the describer process after the stack has started."""
    try:
        return ",".join(kind.value for kind in parse_prompt_kinds(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv: Sequence[str] | None) -> MainJobConfig:
    defaults = MainJobConfig()
    parser = argparse.ArgumentParser(
        prog="spr-main", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=defaults.work, help="working folder")
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--regions-per-round", type=int, default=defaults.regions_per_round)
    parser.add_argument("--samples", type=int, default=defaults.samples, help="descriptions per region (N)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--lambda-sem", type=float, default=defaults.lambda_sem)
    parser.add_argument(
        "--refine-iou",
        type=float,
        default=defaults.refine_iou,
        help="refinement replaces a described box by the GT box it overlaps above this IoU",
    )
    parser.add_argument(
        "--prompt-modes",
        type=prompt_modes,
        default=defaults.prompt_modes,
        help="describer prompt modes, comma-separated (crop, full-box), one per region by its id",
    )
    parser.add_argument("--eval-limit", type=int, default=defaults.eval_limit, help="held-out expressions")
    parser.add_argument("--broker", choices=["noida", "tansu"], default=defaults.broker)
    parser.add_argument("--bootstrap-steps", type=int, default=0, help="SFT steps (0 = the recipe's)")
    parser.add_argument("--bootstrap-images", type=int, default=0, help="world size (0 = the recipe's)")
    parser.add_argument(
        "--bootstrap-batch-size", type=int, default=0, help="SFT examples per step (0 = the recipe's)"
    )
    parser.add_argument(
        "--bootstrap-vision-steps",
        type=int,
        default=-1,
        help="vision tower pretraining steps before SFT (-1 = the recipe's, 0 = none)",
    )
    parser.add_argument(
        "--bootstrap-box-slack",
        type=float,
        default=-1.0,
        help="SFT answers' boxes drawn this share of their size loose on every side (-1 = the recipe's,"
        " 0 = exact boxes)",
    )
    parser.add_argument(
        "--bootstrap-coordinate-sigma",
        type=float,
        default=-1.0,
        help="width (in 0-999 bins) of the SFT's Gaussian soft labels over the box numbers (-1 = the"
        " recipe's, 0 = hard labels)",
    )
    parser.add_argument(
        "--bootstrap-rec-answer-names-object",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the bootstrap's REC answers name the target before its box (default: the recipe's)",
    )
    parser.add_argument(
        "--grounder",
        choices=["world", "policy"],
        default=defaults.grounder,
        help="who grounds phrases for S_loc: the OWLv2 trained on the world, or the policy through Triton",
    )
    parser.add_argument(
        "--grounder-steps", type=int, default=0, help="world grounder training steps (0 = its recipe's)"
    )
    parser.add_argument("--trainer-arg", action="append", default=[], help="passed to spr-trainer once")
    parser.add_argument(
        "--service-threads",
        type=int,
        default=defaults.service_threads,
        help="math threads of Triton, each stage, the trainer and the evaluation (0: one per core each)",
    )
    args = parser.parse_args(argv)
    return MainJobConfig(
        work=args.work,
        rounds=args.rounds,
        regions_per_round=args.regions_per_round,
        samples=args.samples,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        lambda_sem=args.lambda_sem,
        refine_iou=args.refine_iou,
        prompt_modes=args.prompt_modes,
        eval_limit=args.eval_limit,
        broker=args.broker,
        bootstrap_steps=args.bootstrap_steps,
        bootstrap_images=args.bootstrap_images,
        bootstrap_vision_steps=args.bootstrap_vision_steps,
        bootstrap_box_slack=args.bootstrap_box_slack,
        bootstrap_coordinate_sigma=args.bootstrap_coordinate_sigma,
        bootstrap_batch_size=args.bootstrap_batch_size,
        bootstrap_rec_names_object=args.bootstrap_rec_answer_names_object,
        grounder=args.grounder,
        grounder_steps=args.grounder_steps,
        trainer_args=tuple(a for arg in args.trainer_arg for a in arg.split()),
        service_threads=args.service_threads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM (`timeout`, a container stop) must unwind like Ctrl-C, so that the broker, Triton and every
    # stage process are stopped by their context managers instead of being left running.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    return run(parse_args(argv if argv is not None else sys.argv[1:]))


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
