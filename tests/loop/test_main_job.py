"""The README's first command, shortened: one round on a tiny world proves the whole loop's plumbing.

bootstrap (a few SFT steps) -> broker + Triton + every stage as its own process -> pairs -> one DPO
round (`spr-trainer once`) -> the adapter published, announced and hot-loaded by Triton as `latest`
-> the REC evaluation of base and round 1 -> report, plot and Prometheus metrics. The full run (more
rounds, the real bootstrap) is the benchmark, not a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.bootstrap.recipe import PolicyRecipe
from services.loop.main_job import main, parse_args, pipeline_of, recipe_of


def test_prompt_modes_reach_the_describer_and_unknown_ones_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert pipeline_of(parse_args([]), Path("p"), None).prompt_modes == "crop,full-box"
    cfg = parse_args(["--prompt-modes", " full-box "])
    assert pipeline_of(cfg, Path("p"), None).prompt_modes == "full-box"
    with pytest.raises(SystemExit):
        parse_args(["--prompt-modes", "crop,zoom"])
    assert "expected a comma-separated list" in capsys.readouterr().err


def test_bootstrap_knobs_reach_the_recipe_and_defaults_keep_it() -> None:
    assert recipe_of(parse_args([])) == PolicyRecipe()
    args = ["--bootstrap-steps", "1000", "--bootstrap-coordinate-sigma", "15", "--bootstrap-box-slack", "0"]
    recipe = recipe_of(parse_args([*args, "--bootstrap-batch-size", "16"]))
    assert (recipe.steps, recipe.coordinate_sigma_bins, recipe.box_label_slack) == (1000, 15.0, 0.0)
    assert recipe.batch_size == 16
    assert recipe.fingerprint() != PolicyRecipe().fingerprint()  # another cache folder
    assert recipe_of(parse_args(["--bootstrap-coordinate-sigma", "0"])).coordinate_sigma_bins == 0.0


@pytest.mark.integration
def test_one_round_on_a_tiny_world_publishes_serves_and_evaluates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPR_BOOTSTRAP_CACHE", str(tmp_path / "bootstrap"))
    trainer = "--lora_r 8 --lora_alpha 16 --max_steps 2 --batch_size 2 --min_pairs 1 --heldout_fraction 0"
    argv = [
        "--work", str(tmp_path / "work"),
        "--rounds", "1",
        "--regions-per-round", "6",
        "--samples", "3",
        "--max-new-tokens", "24",
        "--eval-limit", "24",
        "--bootstrap-steps", "12",
        "--bootstrap-images", "40",
        "--bootstrap-vision-steps", "4",
        "--grounder-steps", "3",
        "--trainer-arg", trainer,
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    work = tmp_path / "work"
    assert "world grounder (trained now" in out
    assert "decided 6/6 regions" in out
    assert "published spr-v1-" in out, out[-3000:]
    results = json.loads((work / "rec_results.json").read_text())
    names = list(results["accuracy"])
    assert names[0] == "base" and names[1].startswith("round 1 (spr-v1-")
    assert all(len(p) == 24 for p in results["predictions"].values())
    assert (work / "rec_accuracy.png").stat().st_size > 0
    metrics = (work / "metrics.prom").read_text()
    assert 'spr_rec_accuracy{adapter="base",iou="0.5"}' in metrics
    assert "spr_rec_accuracy_gain{" in metrics
