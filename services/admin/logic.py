"""The admin core: adapter versions and aliases, promotion through the eval gate, rollback, and
pipeline stats. No gRPC here; the results are the ``spr.v1`` messages the servicer returns.

Sources of truth (SPEC §3, "Adapter lifecycle"):

* versions — the adapter store (complete, verified folders); a version is promotable only if the
  store holds it and its files match their manifest;
* aliases — the compacted ``adapters`` topic; every replica follows it, so moving an alias there
  is all a promotion or rollback does (no replica is called);
* what is loaded — each replica's Triton metrics (:mod:`.replicas`).

Promotions and rollbacks of this process are serialized, so ``previous_version`` and the gate's
reference are the alias's state at the moment of the move. Several admin replicas do not coordinate;
run one.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from kafka.errors import KafkaError

from services.adapters.events import announce_version, move_alias
from services.adapters.state import AdapterHistory
from services.adapters.store import MANIFEST_NAME, AdapterStore, AdapterStoreError, manifest_from_json
from services.admin import metrics
from services.admin.errors import (
    AdapterBaseMismatch,
    AdapterCorrupt,
    AliasNotFound,
    EvalGateFailed,
    EvalMetricsMissing,
    NoPreviousVersion,
    VersionNotInStore,
)
from services.admin.gate import evaluate_gate, require_gate
from services.admin.history import AdapterTopicReader
from services.admin.pipeline import PipelineStatsReader
from services.admin.replicas import ReplicaStatus, merge_loaded, scrape_replicas
from services.admin.settings import AdminSettings, fail_fast_producer
from services.common.errors import InvalidRequest, UpstreamUnavailable
from services.common.kafka_io import ProtoProducer, ensure_topics
from services.common.topics import trainer_control_topic
from spr.v1 import adapters_pb2

#: A trigger's reason is stored in every manifest it leads to: a sentence, not a document.
MAX_TRIGGER_REASON = 500

#: Alias names end up in the record key ``alias/<name>`` and in metric labels: keep them plain.
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")

Scraper = Callable[[Sequence[str], float], list[ReplicaStatus]]


def check_alias(alias: str) -> str:
    """Return ``alias`` if it is a valid alias name, else raise :class:`InvalidRequest`."""
    if not _ALIAS_RE.match(alias):
        raise InvalidRequest(
            f"alias {alias!r} must be 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter"
        )
    return alias


class AdminCore:
    """Everything behind ``spr.v1.Admin``; thread-safe, one per process."""

    def __init__(
        self,
        settings: AdminSettings,
        *,
        store: AdapterStore | None = None,
        scraper: Scraper = scrape_replicas,
    ) -> None:
        self.settings = settings
        self.store = store or AdapterStore(settings.adapter_store)
        kafka = settings.kafka()
        self.kafka = kafka
        self.topic = AdapterTopicReader(kafka, sync_timeout_s=settings.topic_sync_timeout_s)
        self.stats = PipelineStatsReader(kafka, settings.stages, settings.rate_window_s)
        self._scraper = scraper
        self._moves_lock = threading.Lock()
        self._producer_lock = threading.Lock()
        self._producer: ProtoProducer | None = None
        self._control_topic_ready = False

    def close(self) -> None:
        """Close the Kafka clients."""
        self.topic.close()
        self.stats.close()
        with self._producer_lock:
            if self._producer is not None:
                self._producer.close(timeout=5)
                self._producer = None

    # --- ListAdapters --------------------------------------------------------------------------------

    def replica_status(self) -> list[ReplicaStatus]:
        """Each configured replica's loaded adapters and aliases (or its scrape error)."""
        return self._scraper(self.settings.replica_metrics_urls, self.settings.scrape_timeout_s)

    def list_adapters(self) -> adapters_pb2.ListAdaptersResponse:
        """Store versions (oldest first), the topic's aliases, and what the replicas have loaded.

        ``loaded`` merges the replicas: one entry per version resident on any of them, requests
        summed (the message has no replica field yet). An alias that is absent means the base model.
        """
        history = self.topic.sync()
        versions = self._store_versions()
        loaded = merge_loaded(self.replica_status())
        return adapters_pb2.ListAdaptersResponse(
            versions=versions,
            aliases=history.aliases,
            loaded=[
                adapters_pb2.LoadedAdapter(
                    version=a.version, load_seconds=a.load_seconds, requests_served=a.requests_served
                )
                for a in loaded
            ],
        )

    def _store_versions(self) -> list[adapters_pb2.AdapterManifest]:
        try:
            return self.store.list_versions()
        except OSError as exc:
            raise UpstreamUnavailable(f"cannot list the adapter store {self.store.root}: {exc}") from exc

    # --- Promote ----------------------------------------------------------------------------------

    def promote(
        self, version: str, alias: str, reason: str = "", *, skip_eval_gate: bool = False
    ) -> adapters_pb2.AliasResponse:
        """Point ``alias`` at ``version`` after checking the store and, for gated aliases, the gate."""
        check_alias(alias)
        if not version:
            raise InvalidRequest("version is required (promote names a version, not the base model)")
        manifest = self._verified_manifest(version)
        with self._moves_lock:
            history = self.topic.sync()
            previous = history.current(alias)
            notes = [reason] if reason else []
            if alias in self.settings.gated_aliases:
                notes.append(self._gate(manifest, alias, previous, history, skip_eval_gate))
            with self._producing() as producer:
                if version not in history.manifests:
                    # Lets replicas preload it before the alias names it (e.g. a trainer that died
                    # between the store write and its announcement).
                    announce_version(producer, manifest)
                update = move_alias(producer, alias, version, "; ".join(["promoted by admin", *notes]))
        metrics.ALIAS_MOVES.labels(alias, metrics.ACTION_PROMOTE).inc()
        return adapters_pb2.AliasResponse(alias=update, previous_version=previous or "")

    def _gate(
        self,
        manifest: adapters_pb2.AdapterManifest,
        alias: str,
        previous: str | None,
        history: AdapterHistory,
        skip: bool,
    ) -> str:
        """Apply the eval gate against the alias's current version; return the note for the reason."""
        if skip:
            metrics.GATE_SKIPPED.labels(alias).inc()
            return "eval gate skipped"
        reference = self._reference_metrics(previous, manifest.version, history)
        try:
            result = evaluate_gate(
                manifest.metrics,
                reference,
                self.settings.eval_gate_tolerances,
                candidate_name=manifest.version,
                reference_name=f"{alias} ({previous})",
            )
            require_gate(result, manifest.version, f"{alias} ({previous})")
        except (EvalGateFailed, EvalMetricsMissing) as exc:
            metrics.PROMOTIONS_REFUSED.labels(alias, exc.code.lower()).inc()
            raise
        return f"eval gate passed: {result.summary()}"

    def _reference_metrics(
        self, previous: str | None, version: str, history: AdapterHistory
    ) -> dict[str, float] | None:
        """Metrics of the alias's current version; None when it names nothing (or the base) yet."""
        if not previous or previous == version:
            return None
        manifest = self._stored_manifest(previous) or history.manifests.get(previous)
        if manifest is None:
            raise EvalMetricsMissing(
                f"the current version {previous} has no manifest in the store or on the adapters topic "
                "to compare against; promote with skip_eval_gate"
            )
        return dict(manifest.metrics)

    # --- Rollback ---------------------------------------------------------------------------------

    def rollback(self, alias: str, to_version: str = "", reason: str = "") -> adapters_pb2.AliasResponse:
        """Point ``alias`` back at ``to_version``, or at the version it named before its current one.

        Not gated: rollback is the way out of a bad promotion and must not depend on metrics.
        """
        check_alias(alias)
        with self._moves_lock:
            history = self.topic.sync()
            current = history.current(alias)
            if current is None:
                raise AliasNotFound(f"alias {alias!r} was never set on the adapters topic")
            target = to_version or self._previous(alias, current, history)
            if target:  # "" is the base model, which is in no store
                self._verified_manifest(target)
            note = f"rollback from {current or 'base'}" + (f": {reason}" if reason else "")
            with self._producing() as producer:
                update = move_alias(producer, alias, target, note)
        metrics.ALIAS_MOVES.labels(alias, metrics.ACTION_ROLLBACK).inc()
        return adapters_pb2.AliasResponse(alias=update, previous_version=current)

    @staticmethod
    def _previous(alias: str, current: str, history: AdapterHistory) -> str:
        previous = history.previous(alias)
        if previous is None:
            raise NoPreviousVersion(
                f"no version of {alias!r} before {current or 'base'} is on record (the compacted topic "
                "keeps only an alias's last move); pass to_version"
            )
        return previous

    # --- PipelineStats, TriggerTraining --------------------------------------------------------------

    def pipeline_stats(self) -> adapters_pb2.PipelineStatsResponse:
        """Lag, throughput and dead letters per stage (pairs built/skipped: not measured yet)."""
        return adapters_pb2.PipelineStatsResponse(
            stages=[
                adapters_pb2.StageStats(
                    stage=s.stage,
                    consumer_lag=s.consumer_lag,
                    records_per_second=s.records_per_second,
                    dead_letters=s.dead_letters,
                )
                for s in self.stats.read()
            ]
        )

    def trigger_training(self, reason: str = "") -> adapters_pb2.TriggerTrainingResponse:
        """Queue an on-demand round on ``trainer.control``; the trainer's run mode starts it when it reads it.

        Accepted means durably queued (acknowledged by the broker), not trained: the round's manifest
        records the returned ``trigger_id``, which is how a caller finds the version it led to.
        """
        if len(reason) > MAX_TRIGGER_REASON:
            raise InvalidRequest(f"reason is {len(reason)} characters, at most {MAX_TRIGGER_REASON} allowed")
        trigger = adapters_pb2.TrainingTrigger(
            trigger_id=f"trigger-{uuid.uuid4().hex[:12]}",
            kind=adapters_pb2.TRIGGER_KIND_ON_DEMAND,
            reason=reason or "requested through the Admin API",
            requested_unix_ms=int(time.time() * 1000),
        )
        topic = trainer_control_topic()
        with self._producing() as producer:
            if not self._control_topic_ready:
                ensure_topics(self.kafka, [topic])
                self._control_topic_ready = True
            sent = producer.send_and_wait(topic, trigger.trigger_id, trigger)
        metrics.TRAINING_TRIGGERS.inc()
        return adapters_pb2.TriggerTrainingResponse(
            accepted=True,
            trigger_id=trigger.trigger_id,
            message=f"queued on {topic.name} at offset {sent.offset}; the trainer (run mode) starts a round "
            "when it reads it, and that round's manifest records this trigger_id",
        )

    # --- helpers ----------------------------------------------------------------------------------

    def _verified_manifest(self, version: str) -> adapters_pb2.AdapterManifest:
        """The manifest of a complete version whose files match it, or the matching error."""
        try:
            folder = self.store.path_of(version)
        except AdapterStoreError as exc:
            raise InvalidRequest(str(exc)) from None
        if not (folder / MANIFEST_NAME).is_file():
            raise VersionNotInStore(
                f"adapter version {version!r} is not in the adapter store {self.store.root}"
            )
        try:
            manifest = self.store.verify(version).manifest
        except AdapterStoreError as exc:
            raise AdapterCorrupt(str(exc)) from None
        base = self.settings.base_model_id
        if base and manifest.base_model_id != base:
            raise AdapterBaseMismatch(
                f"adapter {version!r} was trained on {manifest.base_model_id!r}, the replicas serve {base!r}"
            )
        return manifest

    def _stored_manifest(self, version: str) -> adapters_pb2.AdapterManifest | None:
        """A version's manifest from the store without checking its files (a gate reference)."""
        try:
            path = self.store.path_of(version) / MANIFEST_NAME
            return manifest_from_json(path.read_text()) if path.is_file() else None
        except (AdapterStoreError, OSError, ValueError):
            return None  # the caller falls back to the manifest announced on the topic

    @contextmanager
    def _producing(self) -> Iterator[ProtoProducer]:
        """The shared producer; broker failures become UNAVAILABLE and reconnect on the next call."""
        with self._producer_lock:
            try:
                if self._producer is None:
                    self._producer = ProtoProducer(self.kafka, **fail_fast_producer(self.kafka))
                producer = self._producer
            except KafkaError as exc:
                raise UpstreamUnavailable(f"cannot reach Kafka to update the adapters topic: {exc}") from exc
        try:
            yield producer
        except KafkaError as exc:
            self._drop_producer(producer)
            raise UpstreamUnavailable(f"the adapters topic did not take the update: {exc}") from exc

    def _drop_producer(self, producer: ProtoProducer) -> None:
        with self._producer_lock:
            if self._producer is producer:
                self._producer = None
        producer.close(timeout=0)
