"""Config defaults, the trigger policy, the eval gate decision and version naming (no model, no broker)."""

from __future__ import annotations

import time

import pytest

from services.adapters.state import AdapterHistory
from spr.v1 import adapters_pb2, pairs_pb2
from trainer.config import PREFERENCE_ACCURACY, REWARD_MARGIN, TrainerConfig
from trainer.publish import gate_passes, round_index
from trainer.recipe import training_losses
from trainer.rounds import TriggerPolicy
from trainer.source import Batch, on_demand


def test_defaults_are_the_papers() -> None:
    cfg = TrainerConfig()
    assert (cfg.beta, cfg.lora_r, cfg.lora_alpha, cfg.learning_rate) == (0.1, 128, 256, 1e-5)
    assert (cfg.lr_scheduler, cfg.warmup_ratio, cfg.num_epochs) == ("cosine", 0.1, 1.0)
    assert cfg.rpo_alpha > 0 and cfg.continue_from == "latest"
    assert TrainerConfig(device="cpu").use_bf16() is False
    assert TrainerConfig(device="cpu", bf16="true").use_bf16() is True
    assert training_losses(cfg) == (["sigmoid", "sft"], [1.0, cfg.rpo_alpha])  # DPO + NLL on the chosen


def test_objectives_map_to_trls_losses() -> None:
    anchored = TrainerConfig(dpo_loss="apo_zero", rpo_alpha=0.5)
    assert training_losses(anchored) == (["apo_zero", "sft"], [1.0, 0.5])
    assert training_losses(TrainerConfig(dpo_loss="ipo", rpo_alpha=0)) == (["ipo"], [1.0])
    assert training_losses(TrainerConfig(objective="sft-chosen", dpo_loss="ipo")) == (["sft"], [1.0])
    with pytest.raises(ValueError, match="dpo_loss"):
        TrainerConfig(dpo_loss="kto")
    with pytest.raises(ValueError, match="objective"):
        TrainerConfig(objective="ppo")


def _history(stable_metrics: dict[str, float] | None) -> AdapterHistory:
    history = AdapterHistory()
    if stable_metrics is not None:
        history.apply(
            adapters_pb2.AdapterEvent(
                published=adapters_pb2.AdapterManifest(version="v1", metrics=stable_metrics)
            )
        )
        history.apply(adapters_pb2.AdapterEvent(alias=adapters_pb2.AliasUpdate(alias="stable", version="v1")))
    return history


def _candidate(accuracy: float, margin: float) -> adapters_pb2.AdapterManifest:
    return adapters_pb2.AdapterManifest(
        version="v2", metrics={PREFERENCE_ACCURACY: accuracy, REWARD_MARGIN: margin}
    )


def test_gate_uses_the_admin_rule_with_tolerances() -> None:
    cfg = TrainerConfig(gate_tolerance_accuracy=0.05, gate_tolerance_margin=0.1)
    reference = _history({PREFERENCE_ACCURACY: 0.8, REWARD_MARGIN: 0.5})
    assert gate_passes(cfg, _candidate(0.76, 0.45), reference)  # worse, but within tolerance
    assert not gate_passes(cfg, _candidate(0.70, 0.9), reference)
    assert gate_passes(cfg, _candidate(0.1, 0.0), _history(None))  # no stable yet
    assert not gate_passes(cfg, adapters_pb2.AdapterManifest(version="v3"), reference)  # unevaluated


def test_round_index_follows_the_parent() -> None:
    assert round_index("") == 1
    assert round_index("spr-v7-3f2a9c1e") == 8


def _batch(n: int) -> Batch:
    from services.common.kafka_io import ConsumedRecord

    batch = Batch()
    for i in range(n):
        decision = pairs_pb2.PairDecision(pair=pairs_pb2.PreferencePair(pair_id=f"p{i}"))
        batch.add([ConsumedRecord("pairs", i % 2, i, f"r{i}", decision, 1, 0, ())])
    return batch


def _demand(trigger_id: str) -> adapters_pb2.TrainingTrigger:
    return adapters_pb2.TrainingTrigger(
        trigger_id=trigger_id, kind=adapters_pb2.TRIGGER_KIND_ON_DEMAND, reason="operator"
    )


def test_trigger_every_n_pairs_every_t_minutes_or_on_demand() -> None:
    policy = TriggerPolicy(TrainerConfig(trigger_every_pairs=4, trigger_every_minutes=0, min_pairs=2))
    assert policy.due(_batch(3), set()) is None
    due = policy.due(_batch(4), set())
    assert due is not None and due.kind == adapters_pb2.TRIGGER_KIND_PAIR_COUNT
    assert policy.due(_batch(5), {"p0", "p1"}) is None  # already-trained pairs do not count
    timed = TriggerPolicy(TrainerConfig(trigger_every_pairs=100, trigger_every_minutes=1, min_pairs=2))
    old = _batch(2)
    assert timed.due(old, set()) is None
    old.started_monotonic = time.monotonic() - 61
    due = timed.due(old, set())
    assert due is not None and due.kind == adapters_pb2.TRIGGER_KIND_INTERVAL
    assert timed.due(_batch(1), set()) is None  # never below min_pairs
    # On demand: answered at once, even with nothing waiting (the round then skips).
    demanded = timed.due(Batch(), set(), [_demand("t-1"), _demand("t-2")])
    assert demanded is not None and demanded.trigger_id == "t-1"


def test_on_demand_keeps_well_formed_requests_only() -> None:
    from services.common.kafka_io import ConsumedRecord, UndecodableRecord

    good = ConsumedRecord("trainer.control", 0, 0, "t-1", _demand("t-1"), 1, 0, ())
    no_id = ConsumedRecord(
        "trainer.control",
        0,
        1,
        "x",
        adapters_pb2.TrainingTrigger(kind=adapters_pb2.TRIGGER_KIND_ON_DEMAND),
        1,
        0,
        (),
    )
    broken = UndecodableRecord("trainer.control", 0, 2, b"k", b"\xff", (), "bad header")
    assert [t.trigger_id for t in on_demand([good, no_id, broken])] == ["t-1"]


def test_batch_ranges_and_duplicates() -> None:
    batch = _batch(5)
    batch.add(_batch(1).records)  # a redelivered duplicate of p0 at offset 0
    assert [p.pair_id for p in batch.pairs()] == ["p0", "p1", "p2", "p3", "p4"]
    assert [(r.partition, r.start_offset, r.end_offset) for r in batch.ranges()] == [(0, 0, 5), (1, 1, 4)]


def test_fresh_pairs_leave_out_already_trained_ids() -> None:
    batch = _batch(4)
    assert [p.pair_id for p in batch.fresh_pairs({"p1", "p3", "elsewhere"})] == ["p0", "p2"]
    assert batch.fresh_pairs({"p0", "p1", "p2", "p3"}) == []
