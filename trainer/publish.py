"""Publication of a trained round: manifest lineage, atomic store write, announcement, aliases, gate.

Order matters for crash safety (issue 6, "Commit last"):

1. `AdapterStore.publish` — staging copy, fsync, one rename; the manifest is written last. A crash
   before the rename leaves only a staging folder, which is never listed.
2. announce the version on `adapters`, move `latest` at once;
3. move `stable` only if the eval gate (the admin's `services.admin.gate` rule) passes: held-out
   preference metrics against the stable manifest's, and, when `gate_rec_data` is set, REC accuracy
   against the stable version (or the base) measured now on the same set (`trainer.rec_gate`);
4. the caller commits the Kafka offsets — only after all of the above returned.

A crash between 1 and 4 redelivers the pairs. The version holds the ids of its pairs
(`services.adapters.store.PAIR_IDS_NAME`), so the rerun does not train them again: it first finishes
the interrupted publication (`finish_interrupted`: steps 2 and 3 for a stored version the topic never
heard of), then drops the already-trained pairs and commits their offsets.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from services.adapters.events import announce_version, move_alias
from services.adapters.state import AdapterHistory
from services.adapters.store import AdapterStore, sha256_file
from services.admin.errors import EvalMetricsMissing
from services.admin.gate import GateResult, evaluate_gate
from services.admin.history import AdapterTopicReader
from services.common.kafka_io import ProtoProducer
from services.describer.logic import code_version
from spr.v1 import adapters_pb2
from trainer.config import REC_ACCURACY, TrainerConfig
from trainer.rec_gate import RecComparison, compare

log = logging.getLogger(__name__)

LATEST = "latest"
STABLE = "stable"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_ROUND_RE = re.compile(r"^spr-v(\d+)-")


@dataclass(frozen=True)
class Parent:
    """The adapter a round continues from ("" version = the base model)."""

    version: str
    path: Path | None


def base_model_sha256(base_model: str) -> str:
    """sha256 over the base model's weight files (name + content digest), "" when not a local folder."""
    folder = Path(base_model)
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)):
        digest.update(f"{path.relative_to(folder)}\0{sha256_file(path)}\0".encode())
    return digest.hexdigest()


def read_history(cfg: TrainerConfig) -> AdapterHistory:
    """Aliases and manifests as every replica sees them (the compacted `adapters` topic)."""
    reader = AdapterTopicReader(cfg.kafka())
    try:
        return reader.sync()
    finally:
        reader.close()


def resolve_parent(cfg: TrainerConfig, store: AdapterStore, history: AdapterHistory) -> Parent:
    """`continue_from`: 'base', an alias on the topic, or a version in the store."""
    if cfg.continue_from == "base":
        return Parent("", None)
    version = history.current(cfg.continue_from)
    if version is None:
        version = cfg.continue_from if store.path_of(cfg.continue_from).is_dir() else ""
    if not version:
        log.info("%s names no adapter yet: training a fresh LoRA on the base", cfg.continue_from)
        return Parent("", None)
    verified = store.verify(version, expected_base_model_id=cfg.base_model)
    return Parent(version, verified.path)


def round_index(parent_version: str) -> int:
    """The parent's round + 1 (1 from the base): stable across reruns, so names stay content-addressed."""
    match = _ROUND_RE.match(parent_version)
    return int(match.group(1)) + 1 if match else 1


def build_manifest(
    cfg: TrainerConfig,
    parent: Parent,
    ranges: list[adapters_pb2.PairRange],
    pair_count: int,
    dataset_sha: str,
    metrics: dict[str, float],
    trigger: adapters_pb2.TrainingTrigger,
) -> adapters_pb2.AdapterManifest:
    """Lineage of one round; the store fills in version, files, uri and time."""
    return adapters_pb2.AdapterManifest(
        parent_version=parent.version,
        base_model_id=cfg.base_model,
        base_model_sha256=base_model_sha256(cfg.base_model),
        pair_ranges=ranges,
        pair_count=pair_count,
        dataset_sha256=dataset_sha,
        hyperparameters=cfg.hyperparameters(),
        metrics=metrics,
        code_version=code_version(),
        trigger=trigger,
    )


def measure_rec(
    cfg: TrainerConfig, store: AdapterStore, history: AdapterHistory, candidate_dir: Path
) -> RecComparison | None:
    """The REC gate's paired measurement of `candidate_dir` against the current `stable` (or the base);
    None when the REC gate is off. Runs before publication: its metrics belong in the manifest."""
    if not cfg.gate_rec_data:
        return None
    return compare(cfg, store, candidate_dir, history.current(STABLE))


def gate_passes(
    cfg: TrainerConfig,
    candidate: adapters_pb2.AdapterManifest,
    history: AdapterHistory,
    rec: RecComparison | None = None,
) -> bool:
    """The admin's eval gate against the current `stable`, and the REC gate when `gate_rec_data` is set;
    `stable` moves only when every part passes, and a part that cannot decide fails."""
    parts = {"preference": _preference_gate(cfg, candidate, history)}
    if cfg.gate_rec_data:
        parts["REC"] = _rec_gate(cfg, rec, candidate.version)
    passed = all(result is not None and result.passed for result in parts.values())
    summary = " | ".join(
        f"{name}: {'cannot decide' if result is None else result.summary()}" for name, result in parts.items()
    )
    if rec is not None:
        summary += f" ({rec.describe()})"
    log.info("eval gate %s: %s", "passed" if passed else "failed", summary)
    return passed


def _preference_gate(
    cfg: TrainerConfig, candidate: adapters_pb2.AdapterManifest, history: AdapterHistory
) -> GateResult | None:
    """Held-out preference metrics of the two manifests; None (logged) when one lacks them."""
    current = history.current(STABLE)
    reference = None
    if current:
        reference_manifest = history.manifests.get(current)
        reference = dict(reference_manifest.metrics) if reference_manifest is not None else {}
    try:
        return evaluate_gate(
            dict(candidate.metrics),
            reference,
            cfg.gate_tolerances(),
            candidate_name=candidate.version,
            reference_name=f"{STABLE} ({current})",
        )
    except EvalMetricsMissing as exc:
        log.warning("eval gate cannot decide, %s stays: %s", STABLE, exc)
        return None


def _rec_gate(cfg: TrainerConfig, rec: RecComparison | None, candidate_name: str) -> GateResult | None:
    """The admin's rule on the REC accuracies measured now on the same set (never a stored value, which
    may come from another set); None (logged) without a measurement, so the gate never guesses."""
    if rec is None:
        log.warning("REC gate is on (%s) but nothing was measured, %s stays", cfg.gate_rec_data, STABLE)
        return None
    try:
        return evaluate_gate(
            {REC_ACCURACY: rec.candidate_accuracy},
            {REC_ACCURACY: rec.reference_accuracy},
            {REC_ACCURACY: cfg.gate_tolerance_rec},
            candidate_name=candidate_name,
            reference_name=rec.reference_name,
        )
    except EvalMetricsMissing as exc:  # a NaN accuracy
        log.warning("REC gate cannot decide, %s stays: %s", STABLE, exc)
        return None


def publish_round(
    cfg: TrainerConfig,
    store: AdapterStore,
    producer: ProtoProducer,
    adapter_dir: Path,
    manifest: adapters_pb2.AdapterManifest,
    history: AdapterHistory,
    rec: RecComparison | None = None,
) -> tuple[adapters_pb2.AdapterManifest, bool]:
    """Publish, announce, move `latest`, and `stable` if gated in (`rec`: the REC gate's measurement of
    this adapter, when that gate is on); returns (manifest, promoted)."""
    log.info("publishing adapter from %s", adapter_dir)
    published = store.publish(adapter_dir, manifest, round_index(manifest.parent_version))
    log.info("published %s", published.version)
    return published, announce_round(cfg, producer, published, history, rec)


def announce_round(
    cfg: TrainerConfig,
    producer: ProtoProducer,
    published: adapters_pb2.AdapterManifest,
    history: AdapterHistory,
    rec: RecComparison | None = None,
) -> bool:
    """Announce a stored version, move `latest` to it, and `stable` if the gate passes; returns promoted."""
    announce_version(producer, published)
    move_alias(producer, LATEST, published.version, "trained")
    promoted = gate_passes(cfg, published, history, rec)
    if promoted:
        move_alias(producer, STABLE, published.version, "eval gate passed")
    return promoted


def interrupted_versions(store: AdapterStore, history: AdapterHistory) -> list[adapters_pb2.AdapterManifest]:
    """Stored versions of this base the topic never heard of, newer than every announced one: rounds
    killed between the store's rename and their announcement. Older unannounced versions (restored
    backups, say) are left to the Admin API: announcing them would move `latest` backwards."""
    announced = [m.created_unix_ms for m in history.manifests.values()]
    newest = max(announced, default=0)
    return [
        m for m in store.list_versions() if m.version not in history.manifests and m.created_unix_ms > newest
    ]


def finish_interrupted(
    cfg: TrainerConfig, store: AdapterStore, producer: ProtoProducer, history: AdapterHistory
) -> list[str]:
    """Finish the publication of interrupted rounds (oldest first); returns their versions."""
    finished = []
    for manifest in interrupted_versions(store, history):
        if manifest.base_model_id != cfg.base_model:
            continue
        verified = store.verify(manifest.version, expected_base_model_id=cfg.base_model)
        log.info("finishing the interrupted publication of %s", verified.manifest.version)
        rec = measure_rec(cfg, store, history, verified.path)  # the REC gate never decides unmeasured
        announce_round(cfg, producer, verified.manifest, history, rec)
        history.apply(adapters_pb2.AdapterEvent(published=verified.manifest))
        finished.append(verified.manifest.version)
    return finished


def rollback(cfg: TrainerConfig, alias: str, to_version: str, reason: str) -> adapters_pb2.AliasResponse:
    """Re-point `alias` (at `to_version`, or its previous version), via the admin's own rule."""
    from services.admin.logic import AdminCore
    from services.admin.settings import AdminSettings

    settings = AdminSettings(
        bootstrap_servers=cfg.bootstrap_servers,
        api_version=cfg.kafka_api_version or None,
        adapter_store=cfg.store,
    )
    core = AdminCore(settings)
    try:
        return core.rollback(alias, to_version, reason)
    finally:
        core.close()
