"""The optional REC gate (issue 6): `stable` moves only if the candidate grounds referring expressions
about as well as the version it would replace.

Both sides are measured now, in one process, on the same expressions (paired), through the serving
code path (`PolicyRunner`, greedy, the `spr-rec-eval` scoring): a `rec_accuracy` stored in the
stable version's manifest may come from another set, limit or code version, so it is never reused.
The reference is the current `stable` version, or the base model when there is none, so the first
adapter must not be worse than the base either. The candidate is scored before it is published,
because its metrics go into the manifest the publication writes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from services.adapters.store import AdapterStore
from services.evaluation.cli import evaluate_one
from services.evaluation.datasets import RecSample, read_any
from services.evaluation.rec import AdapterResult, DifferenceCI, accuracy_at, paired_bootstrap
from services.policy.adapters import BASE
from services.policy.runner import PolicyRunner
from trainer import metrics
from trainer.config import REC_ACCURACY, TrainerConfig

log = logging.getLogger(__name__)

#: The name the not-yet-published candidate is loaded under (never a version name: those start `spr-v`).
CANDIDATE = "candidate"
#: Manifest metrics besides REC_ACCURACY: expressions scored, and the reference's accuracy on them.
REC_SAMPLES = "rec_samples"
REC_REFERENCE_ACCURACY = "rec_reference_accuracy"


@dataclass(frozen=True)
class RecComparison:
    """The candidate and the reference scored on the same REC expressions."""

    candidate: dict[str, float]  # REC_ACCURACY, rec_acc@0.5 .. rec_acc@0.9 (points), REC_SAMPLES
    reference_accuracy: float  # the reference's REC_ACCURACY on the same expressions
    reference_name: str  # "stable (<version>)" or "base"
    samples: int
    difference_at_05: DifferenceCI  # paired bootstrap of Acc@0.5(candidate) - Acc@0.5(reference)

    @property
    def candidate_accuracy(self) -> float:
        """The candidate's mean accuracy over the IoU thresholds (points)."""
        return self.candidate[REC_ACCURACY]

    def manifest_metrics(self) -> dict[str, float]:
        """What goes into the candidate's manifest: its REC metrics and the reference value it met."""
        return {**self.candidate, REC_REFERENCE_ACCURACY: self.reference_accuracy}

    def describe(self) -> str:
        """``n=500, Acc@0.5 +1.2 [-0.8, +3.2] vs base`` for the gate's log line."""
        d = self.difference_at_05
        return (
            f"n={self.samples}, Acc@0.5 {d.difference:+.1f} [{d.low:+.1f}, {d.high:+.1f}] "
            f"vs {self.reference_name}"
        )


def rec_metrics(result: AdapterResult) -> dict[str, float]:
    """Acc@t per threshold, their mean (`rec_accuracy`) and the sample count, as manifest metrics."""
    accuracy = accuracy_at(result.ious())
    named = {f"rec_acc@{t:g}": value for t, value in accuracy.items()}
    named[REC_ACCURACY] = math.fsum(accuracy.values()) / len(accuracy)
    named[REC_SAMPLES] = float(len(result.predictions))
    return named


def load_samples(cfg: TrainerConfig) -> list[RecSample]:
    """The gate's expressions: the first `gate_rec_limit` of `gate_rec_data` (all when 0)."""
    samples = read_any(cfg.gate_rec_data)
    if cfg.gate_rec_limit:
        samples = samples[: cfg.gate_rec_limit]
    if not samples:
        raise ValueError(f"the REC gate set {cfg.gate_rec_data} holds no expressions")
    return samples


def compare(
    cfg: TrainerConfig, store: AdapterStore, candidate_dir: Path, stable_version: str | None
) -> RecComparison:
    """Score the PEFT folder `candidate_dir` and the reference (`stable_version` from the store, verified
    against the base model; the base when None) with one runner, on the same expressions."""
    samples = load_samples(cfg)
    runner = PolicyRunner(
        cfg.base_model,
        device=cfg.resolved_device(),
        dtype=torch.bfloat16 if cfg.use_bf16() else None,
        adapter_store=store,
        base_model_id=cfg.base_model,
    )
    runner.adapters.load_folder(CANDIDATE, candidate_dir)
    reference_name = f"stable ({stable_version})" if stable_version else "base"
    candidate, reference = (
        evaluate_one(runner, samples, adapter, name, cfg.gate_rec_batch_size, cfg.gate_rec_max_new_tokens)
        for adapter, name in ((CANDIDATE, CANDIDATE), (stable_version or BASE, reference_name))
    )
    (difference,) = paired_bootstrap(reference.ious(), candidate.ious(), thresholds=(0.5,))
    comparison = RecComparison(
        rec_metrics(candidate), rec_metrics(reference)[REC_ACCURACY], reference_name, len(samples), difference
    )
    metrics.REC_ACCURACY.labels("candidate").set(comparison.candidate_accuracy)
    metrics.REC_ACCURACY.labels("reference").set(comparison.reference_accuracy)
    log.info(
        "REC gate set %s: candidate %.2f, %s %.2f (%s)",
        cfg.gate_rec_data,
        comparison.candidate_accuracy,
        reference_name,
        comparison.reference_accuracy,
        comparison.describe(),
    )
    return comparison
