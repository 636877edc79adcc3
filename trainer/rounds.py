"""A training round end to end, and the trigger policy of the long-running mode.

`run_round`: pairs consumed so far -> dataset -> DPO -> publication -> offset commit (last). Any
exception or kill before the commit leaves the offsets where they were, so the next run retrains the
same pairs.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.adapters.store import AdapterStore
from services.common.kafka_io import ProtoConsumer, ProtoProducer, ensure_topics
from services.common.topics import adapters_topic
from services.describer.families import get_family
from spr.v1 import pairs_pb2
from trainer import metrics
from trainer.config import TrainerConfig
from trainer.dataset import build_dataset, dataset_sha256, split_heldout
from trainer.publish import build_manifest, publish_round, read_history, resolve_parent
from trainer.recipe import train_round
from trainer.source import Batch

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """The run report of one round (also written as JSON next to the work files)."""

    outcome: str  # published | skipped
    version: str = ""
    parent_version: str = ""
    promoted: bool = False
    pair_count: int = 0
    train_samples_per_second: float = 0.0
    metrics: dict[str, float] | None = None


def run_round(
    cfg: TrainerConfig, consumer: ProtoConsumer[pairs_pb2.PairDecision], batch: Batch
) -> RoundReport:
    """Train on `batch`, publish, then commit its offsets; skip (no commit) below `min_pairs`."""
    pairs = batch.pairs()
    if len(pairs) < cfg.min_pairs:
        log.info("%d pairs < min_pairs %d: nothing to train", len(pairs), cfg.min_pairs)
        metrics.ROUNDS.labels("skipped").inc()
        return RoundReport(outcome="skipped", pair_count=len(pairs))
    store = AdapterStore(cfg.store)
    store.clean_staging()
    ensure_topics(cfg.kafka(), [adapters_topic()])
    history = read_history(cfg)
    parent = resolve_parent(cfg, store, history)
    dataset = build_dataset(pairs, get_family(cfg.model_family))
    train, heldout = split_heldout(dataset, cfg.heldout_fraction)
    work = Path(cfg.work_dir) / f"round-{int(time.time() * 1000)}"
    log.info("training started (parent %s)", parent.version or "base")
    result = train_round(cfg, train, heldout, parent.path, work, [metrics.MetricsCallback()])
    manifest = build_manifest(
        cfg, parent, batch.ranges(), len(pairs), dataset_sha256(dataset), result.metrics
    )
    with ProtoProducer(cfg.kafka()) as producer:
        published, promoted = publish_round(cfg, store, producer, result.adapter_dir, manifest, history)
    if not consumer.commit(batch.records):
        raise RuntimeError("offset commit refused (group rebalanced); the pairs will be retrained")
    log.info("committed offsets %s", [(r.partition, r.end_offset) for r in published.pair_ranges])
    report = RoundReport(
        outcome="published",
        version=published.version,
        parent_version=parent.version,
        promoted=promoted,
        pair_count=len(pairs),
        train_samples_per_second=result.train_samples_per_second,
        metrics=dict(result.metrics),
    )
    _record(report, work)
    return report


def _record(report: RoundReport, work: Path) -> None:
    metrics.PAIRS_CONSUMED.inc(report.pair_count)
    metrics.ADAPTERS_PUBLISHED.inc()
    metrics.ROUNDS.labels("published").inc()
    if report.promoted:
        metrics.PROMOTIONS.inc()
    (work / "report.json").write_text(json.dumps(asdict(report), indent=1, sort_keys=True))
    shutil.rmtree(work / "adapter", ignore_errors=True)  # the store holds the published copy


@dataclass
class Trigger:
    """When the long-running mode trains: every N pairs, every T minutes, or on demand (a file)."""

    cfg: TrainerConfig

    def due(self, batch: Batch) -> str:
        """The reason to train now, or "" to keep reading."""
        waiting = len(batch.pairs())
        if waiting < self.cfg.min_pairs:
            return ""
        if waiting >= self.cfg.trigger_every_pairs:
            return f"{waiting} pairs waiting"
        minutes = (time.monotonic() - batch.started_monotonic) / 60
        if self.cfg.trigger_every_minutes > 0 and minutes >= self.cfg.trigger_every_minutes:
            return f"{minutes:.1f} minutes since the last round"
        if self.cfg.trigger_file and Path(self.cfg.trigger_file).exists():
            Path(self.cfg.trigger_file).unlink(missing_ok=True)
            return "requested on demand"
        return ""
