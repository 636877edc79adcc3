"""`spr-rec-eval` end to end on real (tiny, random-weight) policies through `PolicyRunner`: the base model
and a published LoRA adapter, LLaVA (`[x1, y1, x2, y2]`) and Qwen2.5-VL (JSON, absolute pixels) families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image

from services.adapters.store import AdapterStore
from services.core.boxes import Box
from services.core.formats import CoordinateFormat
from services.evaluation import cli
from services.evaluation.datasets import RecSample, read_spr_rec
from services.evaluation.rec import AdapterResult, Prediction
from services.modelzoo.loading import load_policy
from services.modelzoo.tiny import ensure_model
from services.policy.runner import PolicyRunner
from services.world.build import build_world
from spr.v1 import adapters_pb2


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[RecSample]:
    files = build_world(tmp_path_factory.mktemp("world"), 6, seed=2, test_fraction=0.5)
    return read_spr_rec(files.rec["test"])[:5]


def _publish_random_lora(base: Path, store: AdapterStore, out: Path) -> str:
    model, _ = load_policy(base)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    manifest = store.publish(out, adapters_pb2.AdapterManifest(base_model_id=str(base)), round_index=1)
    return manifest.version


def test_base_and_adapter_are_scored_on_the_same_samples(samples: list[RecSample], tmp_path: Path) -> None:
    base = ensure_model("tiny-llava")
    store = AdapterStore(tmp_path / "store")
    version = _publish_random_lora(base, store, tmp_path / "lora")
    runner = PolicyRunner(str(base), adapter_store=store)
    results = cli.evaluate(runner, samples, [version], batch_size=2, max_new_tokens=8)
    assert [r.name for r in results] == ["base", version]
    for result in results:
        assert [p.sample_id for p in result.predictions] == [s.sample_id for s in samples]
        assert all(0.0 <= p.iou <= 1.0 for p in result.predictions)
    _, stats = runner.adapters.snapshot()
    assert stats[version].requests_served == len(samples)  # the adapter really answered its run


def test_cli_prints_table_and_writes_plot_and_results(
    samples: list[RecSample], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = Path(samples[0].image_path).parents[1] / "rec_test.json"
    model = ensure_model("tiny-qwen2.5-vl")
    assert cli.main(["--model", str(model), "--data", str(data), "--limit", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Acc@0.5" in printed and "base" in printed
    document = json.loads((tmp_path / "rec_results.json").read_text())
    assert len(document["predictions"]["base"]) == 3 and set(document["accuracy"]["base"]) == {
        "0.5", "0.6", "0.7", "0.8", "0.9"
    }  # fmt: skip
    with Image.open(tmp_path / "rec_accuracy.png") as image:
        assert image.format == "PNG"


def test_qwen25_boxes_are_read_in_the_smart_resized_frame() -> None:
    _, processor = load_policy(ensure_model("tiny-qwen2.5-vl"))
    frame_of = cli.frame_function(processor, CoordinateFormat.QWEN25_JSON)
    assert frame_of(96, 96) == (84, 84)  # multiples of 28 within the tiny processor's pixel bounds
    assert cli.frame_function(processor, CoordinateFormat.BRACKET_999)(96, 64) == (96, 64)


def test_unknown_model_type_is_refused() -> None:
    class Config:
        model_type = "bert"

    class Model:
        config = Config()

    with pytest.raises(ValueError, match="bert"):
        cli.coordinate_format(Model())


def test_written_results_read_back_as_they_were(tmp_path: Path) -> None:
    results = [
        AdapterResult(
            "base",
            [Prediction("s1", "[1, 2, 3, 4]", Box(1, 2, 3, 4), 0.25), Prediction("s2", "?", None, 0.0)],
        ),
        AdapterResult(
            "round 1", [Prediction("s1", "x", Box(0, 0, 9, 9), 0.75), Prediction("s2", "y", None, 0.0)]
        ),
    ]
    _, path = cli.write_outputs(results, tmp_path, "t")
    assert cli.read_outputs(path) == results
