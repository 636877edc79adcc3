"""Benchmark: the pair builder's throughput in scored candidates per second and its region-to-pair latency
(``python bench/bench_pairs.py``).

1. **Core**: the join state and ``decide_all`` alone, in process, on already decoded records: one region
   at a time (the baseline), then the regions of a whole poll together, as the builder decides them.
2. **Through the broker**: a backlog of every region's three records is produced first, then one
   ``PairBuilder`` (this process, one thread) consumes, joins, decides, produces and commits until
   every region has its decision. The ratio to (1) is what the Kafka plumbing costs.
3. **Latency**: regions produced at a steady rate below capacity while the builder runs; the latency
   of a region is the CreateTime of its decision minus that of its last input record.

Regions have 8 candidates of 2-3 boxes each (``tests/pairs/records.py``). Throughput figures are medians
of ``--repeats`` runs: on a shared 2-core VM the same code's rate varies by ±20 % from run to run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.kafka_io import ConsumedRecord, KafkaSettings, ProtoProducer, ensure_topics
from services.devstack.broker import BrokerProcess
from services.pairs import metrics
from services.pairs.builder import PairBuilder
from services.pairs.join import JoinState, Kind, Status
from services.pairs.logic import PairRules, decide_all, run_mismatch
from services.pairs.settings import PairBuilderSettings
from tests.pairs.stream import StreamTopics, read_raw, region_messages

CANDIDATES = 8
Messages = list[tuple[str, tuple[Any, Any, Any]]]


def make_regions(count: int, prefix: str) -> Messages:
    return [(f"{prefix}/{i}", region_messages(f"{prefix}/{i}")) for i in range(count)]


def core_rate(regions: Messages, rules: PairRules, poll_records: int) -> float:
    """Scored candidates per second through JoinState + run_mismatch + decide_all, regions decided together
    per ``poll_records`` records, as the builder decides the regions one poll completes."""
    kinds = {"d": Kind.DESCRIPTION, "l": Kind.LOCALIZATION, "s": Kind.SEMANTIC}
    state = JoinState(kinds, kinds.values(), 1_000_000)
    per_poll = max(1, poll_records // 3)
    started = time.perf_counter()
    for first in range(0, len(regions), per_poll):
        complete = []
        for offset, (region_id, messages) in enumerate(regions[first : first + per_poll], first):
            for topic, message in zip(("d", "l", "s"), messages, strict=True):
                added = state.add(ConsumedRecord(topic, 0, offset, region_id, message, 1, 0, ()), 0.0)
            assert added.status is Status.COMPLETE and added.region is not None
            assert not run_mismatch(*messages)
            complete.append(added.region)
        decide_all([messages for _, messages in regions[first : first + per_poll]], rules)
        for region in complete:
            state.close(region)
    return len(regions) * CANDIDATES / (time.perf_counter() - started)


def produce(kafka: KafkaSettings, topics: StreamTopics, regions: Messages, rate: float | None = None) -> None:
    """Every record of every region; at ``rate`` regions/s when given, else as fast as possible."""
    started = time.perf_counter()
    with ProtoProducer(kafka) as producer:
        for i, (region_id, (record, loc, sem)) in enumerate(regions):
            producer.send(topics.descriptions, region_id, record)
            producer.send(topics.localization, region_id, loc)
            producer.send(topics.semantic, region_id, sem)
            if rate is not None:
                time.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))


def decided() -> float:
    return sum(
        sample.value for sample in metrics.DECISIONS.collect()[0].samples if sample.name.endswith("_total")
    )


def broker_rate(kafka: KafkaSettings, topics: StreamTopics, builder: PairBuilder, regions: Messages) -> float:
    """Scored candidates per second from the first record polled to the last decision acknowledged."""
    produce(kafka, topics, regions)
    target = decided() + len(regions)
    while builder.step() == 0:
        pass
    started = time.perf_counter()
    while decided() < target:
        builder.step()
    builder.drain()
    return len(regions) * CANDIDATES / (time.perf_counter() - started)


def latencies(
    kafka: KafkaSettings, topics: StreamTopics, builder: PairBuilder, regions: Messages, rate: float
) -> list[float]:
    """Seconds from each region's last input record to its decision, at a steady production rate."""
    stop = threading.Event()
    thread = threading.Thread(target=builder.run, args=(stop,), daemon=True)
    thread.start()
    produce(kafka, topics, regions, rate)
    wanted = {region_id for region_id, _ in regions}
    pairs = read_raw(
        kafka,
        topics.pairs.name,
        topics.pairs.partitions,
        lambda found: wanted <= {r.key.decode() for r in found},
        120,
    )
    stop.set()
    thread.join(timeout=30)
    last_input: dict[str, int] = {}
    for topic in (topics.descriptions, topics.localization, topics.semantic):
        for record in read_raw(kafka, topic.name, topic.partitions, lambda found: False, 3):
            key = record.key.decode()
            if key in wanted:
                last_input[key] = max(last_input.get(key, 0), record.timestamp)
    return [(r.timestamp - last_input[r.key.decode()]) / 1000 for r in pairs if r.key.decode() in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=3000, help="regions of the throughput runs")
    parser.add_argument("--latency-regions", type=int, default=1000, help="regions of the latency run")
    parser.add_argument("--repeats", type=int, default=5, help="throughput runs; their median is reported")
    parser.add_argument("--broker", choices=["noida", "tansu"], default="noida")
    parser.add_argument(
        "--no-check-crcs", action="store_true", help="skip fetch CRC checks (pure Python without `crc32c`)"
    )
    args = parser.parse_args()

    paced = make_regions(args.latency_regions, "paced")
    backlogs = [make_regions(args.regions, f"bench{i}") for i in range(args.repeats)]
    rules = PairRules(run_id="bench")
    poll_records = PairBuilderSettings.model_fields["batch_size"].default
    core_rate(backlogs[0][:200], rules, poll_records)  # warm-up
    one_by_one = statistics.median(core_rate(backlog, rules, 3) for backlog in backlogs)
    core = statistics.median(core_rate(backlog, rules, poll_records) for backlog in backlogs)
    print(f"medians of {args.repeats} runs of {args.regions} regions each (this machine's speed varies)")
    print(f"join + decide, one region at a time: {one_by_one:8.0f} scored candidates/s")
    label = f"join + decide, {poll_records}-record polls:"
    print(f"{label} {core:8.0f} scored candidates/s ({core / CANDIDATES:.0f} regions/s)")
    print(f"ratio batched / one at a time:       {core / one_by_one:8.2f}")
    print(f"broker {args.broker}, fetch CRC checks {'off' if args.no_check_crcs else 'on'}")
    with BrokerProcess(args.broker) as broker:
        kafka = broker.settings()
        topics = StreamTopics.unique("bench")
        ensure_topics(
            kafka,
            [topics.descriptions, topics.localization, topics.semantic, topics.pairs, topics.dead_letters],
        )
        builder = PairBuilder(
            topics.settings(kafka, run_id="bench", ensure_topics=False, check_crcs=not args.no_check_crcs),
            kafka,
        )
        try:
            runs = [broker_rate(kafka, topics, builder, backlog) for backlog in backlogs]
            through = statistics.median(runs)
            print(
                f"pair builder via broker:   {through:10.0f} scored candidates/s ({through / CANDIDATES:.0f} "
                f"regions/s; runs {min(runs):.0f}-{max(runs):.0f})"
            )
            print(f"ratio builder / core:      {through / core:10.2f}")
            rate = 0.5 * through / CANDIDATES
            seconds = sorted(latencies(kafka, topics, builder, paced, rate))
        finally:
            builder.close()
    p50, p95 = statistics.median(seconds), seconds[int(0.95 * (len(seconds) - 1))]
    print(f"region-to-pair latency at {rate:.0f} regions/s ({len(seconds)} regions):")
    print(f"    p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    verdict = "met" if through >= 20000 else "NOT met"
    print(f"goal: 20000 scored candidates/s on one core (median) -> {verdict}")


if __name__ == "__main__":
    main()
