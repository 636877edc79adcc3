"""ONNX export: every supported model exports, and onnxruntime agrees with PyTorch (graph and scorer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.scorers.common import load_region
from services.scorers.localization.logic import LocalizationScorer
from services.scorers.localization.settings import GroundingBackend, LocalizationSettings
from services.scorers.onnx_export import Parity, main
from services.scorers.semantic.logic import SemanticScorer
from services.scorers.semantic.settings import SemanticBackend, SemanticSettings
from tests.scorers.conftest import ENCODER_MODELS, GROUNDING_MODELS, candidates, make_region, scene_png

TOLERANCE = 1e-3


@pytest.mark.parametrize("name", [*GROUNDING_MODELS, *ENCODER_MODELS])
def test_exported_graphs_match_pytorch(name: str, onnx_exports: dict[str, tuple[Path, list[Parity]]]) -> None:
    folder, report = onnx_exports[name]
    assert (folder / "manifest.json").is_file()
    assert report, "no output compared"
    for parity in report:
        assert parity.max_abs_diff <= TOLERANCE, parity


@pytest.mark.parametrize("name", GROUNDING_MODELS)
def test_onnx_grounder_scores_like_pytorch(
    name: str, tiny_models: dict[str, Path], onnx_exports: dict[str, tuple[Path, list[Parity]]]
) -> None:
    region = load_region(make_region(), scene_png(), LocalizationSettings().images)
    common: dict[str, Any] = {"box_threshold": 0.2}
    torch_scorer = LocalizationScorer(LocalizationSettings(model=str(tiny_models[name]), **common))
    onnx_scorer = LocalizationScorer(
        LocalizationSettings(model=str(onnx_exports[name][0]), backend=GroundingBackend.ONNX, **common)
    )
    expected = torch_scorer.score(region, candidates())
    got = onnx_scorer.score(region, candidates())
    for e, g in zip(expected, got, strict=True):
        assert g.s_loc == pytest.approx(e.s_loc, abs=1e-4)
        assert [b.phrase for b in g.grounded] == [b.phrase for b in e.grounded]
        for eb, gb in zip(e.grounded, g.grounded, strict=True):
            np.testing.assert_allclose(
                [gb.box.x1, gb.box.y1, gb.box.x2, gb.box.y2],
                [eb.box.x1, eb.box.y1, eb.box.x2, eb.box.y2],
                atol=1e-2,
            )


@pytest.mark.parametrize("name", ENCODER_MODELS)
def test_onnx_encoder_scores_like_pytorch(
    name: str, tiny_models: dict[str, Path], onnx_exports: dict[str, tuple[Path, list[Parity]]]
) -> None:
    region = load_region(make_region(), scene_png(), SemanticSettings().images)
    torch_scorer = SemanticScorer(SemanticSettings(model=str(tiny_models[name])))
    onnx_scorer = SemanticScorer(
        SemanticSettings(model=str(onnx_exports[name][0]), backend=SemanticBackend.ONNX)
    )
    for e, g in zip(
        torch_scorer.score(region, candidates()), onnx_scorer.score(region, candidates()), strict=True
    ):
        assert (g.crop_score, g.local_score) == pytest.approx((e.crop_score, e.local_score), abs=1e-4)
        assert g.s_sem == pytest.approx(e.s_sem, abs=1e-4)


def test_export_command_prints_parity(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tiny_models["tiny-clip"]), str(tmp_path / "clip")]) == 0
    out = capsys.readouterr().out
    assert "parity vision[0]: max abs diff" in out
    assert "OK: max abs diff" in out


def test_export_command_refuses_what_it_cannot_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "is not a transformers checkpoint folder (no config.json)" in capsys.readouterr().err
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    assert main([str(other), str(tmp_path / "out")]) == 2
    assert "holds a 'bert' model; spr-export-onnx exports grounding-dino" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
