"""`spr-demo`: run the part of the SPR loop that exists today, end to end, on this machine.

    world -> region sampler -> `regions` (real Kafka-protocol broker)
          -> describer stage -> policy MLLM on the real tritonserver -> `descriptions`
          -> localization score (the model's own boxes vs GT) -> refinement -> pair decision -> `pairs`

What it does not run yet, and says so: the scorer services (so the reward is S_loc of the model's own
boxes alone, lambda = 0), the DPO trainer and adapter publication. They exist as services and commands;
wiring them into several rounds is the main-job issue.
The policy is the tiny random-weight Qwen2.5-VL, so its text is noise and most regions end as
skips; the point is that every region ends in exactly one decision, through the real services.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from services.common.kafka_io import KafkaSettings, ProtoConsumer, ProtoProducer, ensure_topics
from services.common.topics import DESCRIPTIONS, PAIRS, REGIONS, dead_letter_topic, stream_topics
from services.core import as_box_array, localization_score, read_coco
from services.describer.logic import Describer
from services.describer.settings import (
    DescriberSettings,
    SamplingDefaults,
    StageSettings,
    processor_config_of,
)
from services.describer.stage import DescriberStage
from services.devstack.broker import BrokerProcess
from services.devstack.triton import TritonServer
from services.modelzoo.tiny import ensure_model
from services.pairs.logic import PairRules, decide
from services.sampler.regions import iter_regions
from services.world import generate_world
from spr.v1 import common_pb2, describer_pb2, pairs_pb2, scoring_pb2

POLICY_REPOSITORY = Path(__file__).resolve().parents[1] / "policy" / "model_repository"
NOT_YET = (
    "not wired into this demo yet (the main-job issue): the grounding and semantic scorer services "
    "(here reward = S_loc of the model's own boxes, lambda = 0), the pair builder service, the DPO "
    "trainer and the hot reload of what it publishes; each exists and is tested on its own"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="spr-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", type=Path, default=Path.home() / ".cache" / "spr" / "demo", help="working folder"
    )
    parser.add_argument("--images", type=int, default=12, help="images in the generated world")
    parser.add_argument("--regions-per-image", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4, help="descriptions per region (N)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--broker", choices=["noida", "tansu"], default="noida")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every decision")
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(f"[spr-demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def own_box_scores(record: describer_pb2.DescriptionRecord) -> scoring_pb2.LocalizationScoreRecord:
    """S_loc with P = the boxes the model wrote itself (no grounding model yet).

    The describer already parsed every candidate into mentions in full-image pixels.
    """
    gt = as_box_array([(o.box.x1, o.box.y1, o.box.x2, o.box.y2) for o in record.region.ground_truth])
    scores = []
    for candidate in record.candidates:
        boxes = [(m.box.x1, m.box.y1, m.box.x2, m.box.y2) for m in candidate.mentions if m.has_box]
        result = localization_score(gt, as_box_array(boxes))
        scores.append(
            scoring_pb2.LocalizationScore(
                candidate_id=candidate.candidate_id, s_loc=result.s_loc, model_box_count=len(boxes)
            )
        )
    lineage = common_pb2.Lineage(localization_scorer_id="own-boxes@v1")
    return scoring_pb2.LocalizationScoreRecord(
        region_id=record.region.region_id, scores=scores, lineage=lineage
    )


def produce_regions(kafka: KafkaSettings, topics: dict, world: Path, args: argparse.Namespace) -> list[str]:  # type: ignore[type-arg]
    dataset = read_coco(world, world.parent, dataset_id="shapes-demo")
    regions = list(iter_regions(dataset, seed=args.seed, per_image=args.regions_per_image))
    with ProtoProducer(kafka) as producer:
        for region in regions:
            producer.send(topics[REGIONS], region.region_id, region)
    return [r.region_id for r in regions]


def decide_pairs(kafka: KafkaSettings, topics: dict, expected: set[str], deadline: float) -> Counter[str]:  # type: ignore[type-arg]
    """Consume descriptions, score, decide, produce one PairDecision per region."""
    outcomes: Counter[str] = Counter()
    done: set[str] = set()
    rules = PairRules(lambda_sem=0.0, run_id="demo")
    with (
        ProtoConsumer(kafka, "spr-demo-pairs", [topics[DESCRIPTIONS]]) as consumer,
        ProtoProducer(kafka) as producer,
    ):
        while done != expected and time.monotonic() < deadline:
            for polled in consumer.poll(timeout_ms=500):
                record = getattr(polled, "message", None)
                if record is None or record.region.region_id in done:
                    continue
                decision = decide(record, own_box_scores(record), None, rules)
                producer.send(topics[PAIRS], decision.region_id, decision)
                done.add(decision.region_id)
                kind = decision.WhichOneof("decision")
                outcomes["pair" if kind == "pair" else pairs_pb2.SkipReason.Name(decision.skip)] += 1
                say(f"region {decision.region_id}: {kind} {decision.detail}".rstrip())
            producer.flush()
            consumer.commit()
    outcomes["no decision (timed out)"] = len(expected - done)
    return outcomes


def run(args: argparse.Namespace) -> int:
    say("the SPR loop, one-machine mode; " + NOT_YET)
    args.work.mkdir(parents=True, exist_ok=True)
    policy = ensure_model("tiny-qwen2.5-vl")
    say(f"policy: {policy}")
    world = generate_world(args.work / "world", args.images, seed=args.seed)
    say(f"world: {args.images} images, annotations {world}")
    with BrokerProcess(args.broker, workdir=args.work / "broker") as broker:
        kafka = broker.settings()
        topics = stream_topics(partitions=3)
        ensure_topics(kafka, [*topics.values(), dead_letter_topic(REGIONS)])
        say(f"broker ({args.broker}) at {broker.bootstrap_servers}")
        os.environ.update(SPR_POLICY_MODEL_PATH=str(policy), SPR_POLICY_BASE_MODEL_ID=str(policy))
        with TritonServer(POLICY_REPOSITORY, workdir=args.work / "triton", models=["spr_policy"]) as triton:
            say(f"tritonserver ready at {triton.grpc_url} (model spr_policy)")
            expected = set(produce_regions(kafka, topics, world, args))
            say(f"sampled {len(expected)} regions into `regions`")
            outcomes = run_stages(args, kafka, triton, policy, expected)
    print_summary(len(expected), outcomes)
    return 0 if outcomes["no decision (timed out)"] == 0 else 1


def run_stages(
    args: argparse.Namespace, kafka: KafkaSettings, triton: TritonServer, policy: Path, expected: set[str]
) -> Counter[str]:
    settings = DescriberSettings(
        triton_url=triton.grpc_url,
        policy_model_id=str(policy),
        processor_config=processor_config_of(policy),
        sampling=SamplingDefaults(num_samples=args.samples, max_new_tokens=args.max_new_tokens),
    )
    stage = DescriberStage(
        Describer(settings), StageSettings(bootstrap_servers=kafka.bootstrap_servers), kafka
    )
    stop = threading.Event()
    thread = threading.Thread(target=stage.run, args=(stop,), name="describer-stage", daemon=True)
    thread.start()
    try:
        return decide_pairs(kafka, stream_topics(partitions=3), expected, time.monotonic() + args.timeout)
    finally:
        stop.set()
        thread.join(30)
        stage.close()


def print_summary(regions: int, outcomes: Counter[str]) -> None:
    print()
    print(f"{'regions sampled':<40}{regions:>6}")
    for name, count in sorted(outcomes.items()):
        print(f"{name:<40}{count:>6}")
    print(f"\n{NOT_YET}.")


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
