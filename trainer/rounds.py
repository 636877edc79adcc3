"""A training round end to end, and the trigger policy of the long-running mode.

`run_round`: finish an interrupted publication if there is one -> drop pairs a published version was
already trained on -> dataset -> DPO -> REC gate measurement (when on) -> publication -> offset commit
(last). Any exception or kill before the commit leaves the offsets where they were, so the next run
sees the same records again and either retrains them or, if their version made it into the store, only
finishes its publication.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from services.adapters.store import AdapterStore, write_pair_ids
from services.common.kafka_io import ProtoConsumer, ProtoProducer, ensure_topics
from services.common.topics import adapters_topic
from services.describer.families import get_family
from spr.v1 import adapters_pb2, pairs_pb2
from trainer import metrics
from trainer.config import TrainerConfig
from trainer.dataset import build_dataset, dataset_sha256, split_heldout
from trainer.publish import (
    build_manifest,
    finish_interrupted,
    measure_rec,
    publish_round,
    read_history,
    resolve_parent,
)
from trainer.recipe import train_round
from trainer.source import Batch

log = logging.getLogger(__name__)

PUBLISHED = "published"
SKIPPED = "skipped"
ALREADY_TRAINED = "already-trained"


@dataclass
class RoundReport:
    """The run report of one round (also written as JSON next to the work files)."""

    outcome: str  # published | skipped | already-trained
    trigger: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    parent_version: str = ""
    promoted: bool = False
    pair_count: int = 0
    already_trained_dropped: int = 0
    train_samples_per_second: float = 0.0
    metrics: dict[str, float] | None = None


def make_trigger(kind: adapters_pb2.TriggerKind.ValueType, reason: str) -> adapters_pb2.TrainingTrigger:
    """A trigger of the trainer's own policy (on-demand ones come from `trainer.control`)."""
    return adapters_pb2.TrainingTrigger(kind=kind, reason=reason, requested_unix_ms=int(time.time() * 1000))


def describe(trigger: adapters_pb2.TrainingTrigger) -> dict[str, Any]:
    """The trigger as the run report shows it."""
    described: dict[str, Any] = json_format.MessageToDict(trigger, preserving_proto_field_name=True)
    return described


def run_round(
    cfg: TrainerConfig,
    consumer: ProtoConsumer[pairs_pb2.PairDecision],
    batch: Batch,
    trigger: adapters_pb2.TrainingTrigger,
) -> RoundReport:
    """Train on the batch's new pairs, publish, then commit its offsets.

    Below `min_pairs` new pairs it skips without committing; a batch of only already-trained pairs is
    committed without training (its pairs are in a published version already).
    """
    store = AdapterStore(cfg.store)
    store.clean_staging()
    ensure_topics(cfg.kafka(), [adapters_topic()])
    with ProtoProducer(cfg.kafka()) as producer:
        history = read_history(cfg)
        if finish_interrupted(cfg, store, producer, history):
            history = read_history(cfg)  # the aliases moved
        unique = batch.pairs()
        pairs = batch.fresh_pairs(store.trained_pair_ids())
        report = RoundReport(
            outcome=SKIPPED,
            trigger=describe(trigger),
            pair_count=len(pairs),
            already_trained_dropped=len(unique) - len(pairs),
        )
        if report.already_trained_dropped:
            log.warning("dropping %d pairs already trained on", report.already_trained_dropped)
            metrics.PAIRS_ALREADY_TRAINED.inc(report.already_trained_dropped)
        if not pairs and batch.records:
            _commit(consumer, batch)
            report.outcome = ALREADY_TRAINED
            metrics.ROUNDS.labels(ALREADY_TRAINED).inc()
            return report
        if len(pairs) < cfg.min_pairs:
            log.info("%d new pairs < min_pairs %d: nothing to train", len(pairs), cfg.min_pairs)
            metrics.ROUNDS.labels(SKIPPED).inc()
            return report
        parent = resolve_parent(cfg, store, history)
        dataset = build_dataset(pairs, get_family(cfg.model_family))
        train, heldout = split_heldout(dataset, cfg.heldout_fraction)
        work = Path(cfg.work_dir) / f"round-{int(time.time() * 1000)}"
        log.info("training started (parent %s, trigger: %s)", parent.version or "base", trigger.reason)
        result = train_round(cfg, train, heldout, parent.path, work, [metrics.MetricsCallback()])
        write_pair_ids(result.adapter_dir, (pair.pair_id for pair in pairs))
        rec = measure_rec(cfg, store, history, result.adapter_dir)
        if rec is not None:
            result.metrics.update(rec.manifest_metrics())
        manifest = build_manifest(
            cfg, parent, batch.ranges(), len(pairs), dataset_sha256(dataset), result.metrics, trigger
        )
        published, promoted = publish_round(cfg, store, producer, result.adapter_dir, manifest, history, rec)
    _commit(consumer, batch)
    report.outcome = PUBLISHED
    report.version, report.parent_version, report.promoted = published.version, parent.version, promoted
    report.train_samples_per_second = result.train_samples_per_second
    report.metrics = dict(result.metrics)
    _record(report, work)
    return report


def _commit(consumer: ProtoConsumer[pairs_pb2.PairDecision], batch: Batch) -> None:
    if not consumer.commit(batch.records):
        raise RuntimeError("offset commit refused (group rebalanced); the pairs will be read again")
    log.info("committed offsets %s", [(r.partition, r.end_offset) for r in batch.ranges()])


def _record(report: RoundReport, work: Path) -> None:
    metrics.PAIRS_CONSUMED.inc(report.pair_count)
    metrics.ADAPTERS_PUBLISHED.inc()
    metrics.ROUNDS.labels(PUBLISHED).inc()
    if report.promoted:
        metrics.PROMOTIONS.inc()
    (work / "report.json").write_text(json.dumps(asdict(report), indent=1, sort_keys=True))
    shutil.rmtree(work / "adapter", ignore_errors=True)  # the store holds the published copy


@dataclass
class TriggerPolicy:
    """When the long-running mode trains: every N new pairs, every T minutes, or on demand."""

    cfg: TrainerConfig

    def due(
        self,
        batch: Batch,
        trained: set[str],
        requests: list[adapters_pb2.TrainingTrigger] | None = None,
    ) -> adapters_pb2.TrainingTrigger | None:
        """The trigger of a round to run now, or None to keep reading.

        An on-demand request is answered at once, whatever is waiting (the round skips below
        `min_pairs`); the policy triggers count only pairs no version was trained on.
        """
        if requests:
            return requests[0]
        waiting = len(batch.fresh_pairs(trained))
        if waiting < self.cfg.min_pairs:
            return None
        if waiting >= self.cfg.trigger_every_pairs:
            return make_trigger(adapters_pb2.TRIGGER_KIND_PAIR_COUNT, f"{waiting} pairs waiting")
        minutes = (time.monotonic() - batch.started_monotonic) / 60
        if self.cfg.trigger_every_minutes > 0 and minutes >= self.cfg.trigger_every_minutes:
            reason = f"{minutes:.1f} minutes since the last round"
            return make_trigger(adapters_pb2.TRIGGER_KIND_INTERVAL, reason)
        return None
