"""The optional REC gate: the decision (candidate vs a reference measured now, with a tolerance), its
wiring into the publication of an interrupted round, and the paired measurement itself on a real tiny
Qwen2.5-VL with a LoRA folder that is not published yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image, ImageDraw

from services.adapters.state import AdapterHistory
from services.adapters.store import AdapterStore
from services.evaluation import rec as rec_lib
from services.evaluation.cli import evaluate_one
from services.evaluation.datasets import write_spr_rec
from services.modelzoo.loading import load_policy
from services.policy.adapters import AdapterRegistry
from spr.v1 import adapters_pb2
from tests.admin.conftest import write_fake_adapter
from tests.trainer.conftest import small_config
from trainer import publish, rec_gate
from trainer.config import LANGUAGE_MODEL_TARGETS, PREFERENCE_ACCURACY, REC_ACCURACY, REWARD_MARGIN
from trainer.publish import finish_interrupted, gate_passes
from trainer.rec_gate import REC_REFERENCE_ACCURACY, REC_SAMPLES, RecComparison, compare

GOOD = {PREFERENCE_ACCURACY: 0.8, REWARD_MARGIN: 0.5}


def comparison(candidate: float, reference: float, reference_name: str = "base") -> RecComparison:
    difference = rec_lib.DifferenceCI(0.5, candidate - reference, candidate - reference, 0.0, 0.5)
    return RecComparison(
        {REC_ACCURACY: candidate, REC_SAMPLES: 10.0}, reference, reference_name, 10, difference
    )


def history_with_stable(metrics: dict[str, float] | None) -> AdapterHistory:
    history = AdapterHistory()
    if metrics is not None:
        history.apply(
            adapters_pb2.AdapterEvent(published=adapters_pb2.AdapterManifest(version="v1", metrics=metrics))
        )
        history.apply(adapters_pb2.AdapterEvent(alias=adapters_pb2.AliasUpdate(alias="stable", version="v1")))
    return history


def test_rec_gate_refuses_a_drop_beyond_the_tolerance_and_accepts_within(tmp_path: Path) -> None:
    cfg = small_config(Path("base"), tmp_path, gate_rec_data="rec.json", gate_tolerance_rec=1.0)
    candidate = adapters_pb2.AdapterManifest(version="v2", metrics=GOOD)
    history = history_with_stable(GOOD)
    assert gate_passes(cfg, candidate, history, comparison(41.5, 42.0))  # worse, within 1 point
    assert gate_passes(cfg, candidate, history, comparison(50.0, 42.0))
    assert not gate_passes(cfg, candidate, history, comparison(40.0, 42.0))
    # No stable yet: the preference gate has nothing to compare with, the REC gate still has the base.
    assert not gate_passes(cfg, candidate, history_with_stable(None), comparison(10.0, 20.0))
    assert gate_passes(cfg, candidate, history_with_stable(None), comparison(20.0, 20.0))
    # REC on but unmeasured (or NaN) never passes; the preference gate still has its say.
    assert not gate_passes(cfg, candidate, history, None)
    assert not gate_passes(cfg, candidate, history, comparison(float("nan"), 42.0))
    worse = adapters_pb2.AdapterManifest(version="v2", metrics={PREFERENCE_ACCURACY: 0.1, REWARD_MARGIN: 0.0})
    assert not gate_passes(cfg, worse, history, comparison(60.0, 42.0))


def test_rec_gate_off_ignores_rec_and_keeps_the_manifest_lineage_unchanged(tmp_path: Path) -> None:
    cfg = small_config(Path("base"), tmp_path)
    candidate = adapters_pb2.AdapterManifest(version="v2", metrics=GOOD)
    assert gate_passes(cfg, candidate, history_with_stable(GOOD), comparison(0.0, 90.0))
    assert "gate_rec_data" not in cfg.hyperparameters()
    on = small_config(Path("base"), tmp_path, gate_rec_data="rec.json", gate_rec_limit=7)
    assert (on.hyperparameters()["gate_rec_data"], on.hyperparameters()["gate_rec_limit"]) == (
        "rec.json",
        "7",
    )


def test_load_folder_never_shadows_the_base_an_alias_or_a_resident_adapter(tmp_path: Path) -> None:
    registry = AdapterRegistry(model=object(), store=None, base_model_id="base")
    for name in ("", "base", "latest", "stable"):
        with pytest.raises(ValueError, match="taken"):
            registry.load_folder(name, tmp_path)


class RecordingProducer:
    """Stands in for the Kafka producer: keeps the `adapters` events in order."""

    def __init__(self) -> None:
        self.events: list[adapters_pb2.AdapterEvent] = []

    def send_and_wait(self, topic: str, key: Any, event: adapters_pb2.AdapterEvent) -> None:
        self.events.append(event)

    def aliases(self) -> dict[str, str]:
        return {e.alias.alias: e.alias.version for e in self.events if e.WhichOneof("event") == "alias"}


@pytest.mark.parametrize(("measured", "promoted"), [(42.0, True), (30.0, False)])
def test_an_interrupted_publication_is_measured_again_before_the_gate(
    measured: float, promoted: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = small_config(Path("base-model"), tmp_path, gate_rec_data="rec.json")
    store = AdapterStore(cfg.store)
    stable = store.publish(
        write_fake_adapter(tmp_path / "a1", 1, cfg.base_model),
        adapters_pb2.AdapterManifest(base_model_id=cfg.base_model, metrics=GOOD),
        round_index=1,
    )
    history = AdapterHistory()
    history.apply(adapters_pb2.AdapterEvent(published=stable))
    history.apply(
        adapters_pb2.AdapterEvent(alias=adapters_pb2.AliasUpdate(alias="stable", version=stable.version))
    )
    interrupted = store.publish(
        write_fake_adapter(tmp_path / "a2", 2, cfg.base_model),
        adapters_pb2.AdapterManifest(base_model_id=cfg.base_model, metrics=GOOD, created_unix_ms=2**62),
        round_index=2,
    )
    calls: list[tuple[Path, str | None]] = []

    def fake_compare(cfg: Any, store: Any, folder: Path, stable_version: str | None) -> RecComparison:
        calls.append((folder, stable_version))
        return comparison(measured, 42.0, f"stable ({stable_version})")

    monkeypatch.setattr(publish, "compare", fake_compare)
    producer = RecordingProducer()
    assert finish_interrupted(cfg, store, producer, history) == [interrupted.version]  # type: ignore[arg-type]
    assert calls == [(store.path_of(interrupted.version), stable.version)]
    assert producer.aliases()["latest"] == interrupted.version
    assert (producer.aliases().get("stable") == interrupted.version) is promoted


# --- the measurement on a real tiny policy --------------------------------------------------------


@pytest.fixture(scope="module")
def rec_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 96x96 images, one coloured square each, one expression per image (spr-rec/v1)."""
    folder = tmp_path_factory.mktemp("rec")
    images, expressions = [], []
    for i, (colour, box) in enumerate(
        [("red", (10, 10, 50, 50)), ("blue", (40, 30, 90, 80)), ("green", (0, 50, 30, 95))]
    ):
        image = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(image).rectangle(box, fill=colour)
        image.save(folder / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 96, "height": 96})
        expressions.append(
            {"id": f"{i}", "image_id": i, "text": f"the {colour} square", "boxes": [list(box)]}
        )
    return write_spr_rec(folder / "rec.json", "squares", images, expressions)


@pytest.fixture(scope="module")
def lora_folder(tiny_policy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (non-zero) LoRA on the language model, as the trainer would save it."""
    model, _ = load_policy(tiny_policy)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=LANGUAGE_MODEL_TARGETS, init_lora_weights=False)
    folder = tmp_path_factory.mktemp("lora")
    get_peft_model(model, config).save_pretrained(str(folder))
    return folder


def test_candidate_and_reference_are_scored_on_the_same_samples(
    tiny_policy: Path, rec_set: Path, lora_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results: list[rec_lib.AdapterResult] = []

    def recording(*args: Any, **kwargs: Any) -> rec_lib.AdapterResult:
        results.append(evaluate_one(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(rec_gate, "evaluate_one", recording)
    cfg = small_config(
        tiny_policy, tmp_path, gate_rec_data=str(rec_set), gate_rec_limit=2, gate_rec_max_new_tokens=12
    )
    store = AdapterStore(cfg.store)
    stable = store.publish(lora_folder, adapters_pb2.AdapterManifest(base_model_id=cfg.base_model), 1).version

    same = compare(cfg, store, lora_folder, stable)  # the identical adapter as the reference

    assert same.samples == 2 and same.reference_name == f"stable ({stable})"
    expected = {REC_ACCURACY, REC_SAMPLES, *(f"rec_acc@{t:g}" for t in rec_lib.THRESHOLDS)}
    assert set(same.candidate) == expected and same.candidate[REC_SAMPLES] == 2.0
    assert all(0.0 <= same.candidate[key] <= 100.0 for key in expected - {REC_SAMPLES})
    assert same.candidate_accuracy == same.reference_accuracy and same.difference_at_05.difference == 0.0
    assert same.manifest_metrics()[REC_REFERENCE_ACCURACY] == same.reference_accuracy
    candidate, reference = results
    assert [p.sample_id for p in candidate.predictions] == [p.sample_id for p in reference.predictions]
    assert [p.text for p in candidate.predictions] == [
        p.text for p in reference.predictions
    ]  # paired, greedy

    against_base = compare(cfg, store, lora_folder, None)
    assert against_base.reference_name == "base" and against_base.samples == 2
    # The candidate really answered with its LoRA: the base (adapters disabled) says something else.
    assert [p.text for p in results[2].predictions] != [p.text for p in results[3].predictions]
