"""The tiny model factory: cache layout, reuse, determinism and the `spr-tiny-models` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.modelzoo import recipes, tiny


def _manifest(folder: Path) -> dict[str, object]:
    manifest: dict[str, object] = json.loads((folder / tiny.MANIFEST).read_text())
    return manifest


def test_factory_builds_every_recipe(tiny_models: dict[str, Path]) -> None:
    assert set(tiny.MODELS) == set(recipes.RECIPES) == set(tiny_models)
    for name, folder in tiny_models.items():
        assert folder.name.startswith(f"{name}-")
        assert tiny.is_complete(folder)
        assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}


def test_models_are_small(tiny_models: dict[str, Path]) -> None:
    for folder in tiny_models.values():
        size = sum(p.stat().st_size for p in folder.iterdir())
        assert size < 4_000_000, f"{folder.name} is {size} bytes"


def test_cache_hit_is_a_fast_noop(tiny_models: dict[str, Path], tiny_root: Path) -> None:
    before = {name: (folder / "model.safetensors").stat().st_mtime_ns for name, folder in tiny_models.items()}
    start = time.perf_counter()
    again = tiny.ensure_models(out=tiny_root)
    elapsed = time.perf_counter() - start
    assert again == tiny_models
    assert elapsed < 1.0
    after = {name: (folder / "model.safetensors").stat().st_mtime_ns for name, folder in again.items()}
    assert after == before


def test_same_seed_gives_byte_identical_files(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # Another process with another hash seed: set or dict order must not leak into the files.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    command = [sys.executable, "-m", "services.modelzoo.tiny", "--out", str(tmp_path), "--no-check"]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)
    for name, folder in tiny_models.items():
        rebuilt = tiny.model_dir(name, out=tmp_path)
        assert _manifest(rebuilt)["files"] == _manifest(folder)["files"], name


def test_other_seed_changes_weights_not_tokenizer(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    other = tiny.ensure_model("tiny-clip", out=tmp_path, seed=1, check=False)
    assert other.name != tiny_models["tiny-clip"].name
    files_0 = _manifest(tiny_models["tiny-clip"])["files"]
    files_1 = _manifest(other)["files"]
    assert isinstance(files_0, dict) and isinstance(files_1, dict)
    assert files_0["model.safetensors"] != files_1["model.safetensors"]
    assert files_0["tokenizer.json"] == files_1["tokenizer.json"]


def test_incomplete_folder_is_rebuilt(tmp_path: Path) -> None:
    target = tiny.model_dir("tiny-siglip", out=tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a build that died before its manifest
    assert not tiny.is_complete(target)
    assert tiny.ensure_model("tiny-siglip", out=tmp_path, check=False) == target
    assert tiny.is_complete(target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_manifest_tampering_is_detected(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tiny.ensure_model("tiny-owlv2", out=tmp_path, check=False)
    (folder / "model.safetensors").write_bytes(b"truncated")
    assert not tiny.is_complete(folder)


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(tiny.ENV_CACHE, raising=False)
    assert tiny.cache_root() == Path.home() / ".cache" / "spr" / "tiny-models"
    monkeypatch.setenv(tiny.ENV_CACHE, str(tmp_path / "env"))
    assert tiny.cache_root() == tmp_path / "env"
    assert tiny.cache_root(tmp_path / "flag") == tmp_path / "flag"
    assert tiny.model_dir("tiny-clip").parent == tmp_path / "env"


def test_fingerprint_depends_on_seed() -> None:
    assert tiny.fingerprint(0) == tiny.fingerprint(0)
    assert tiny.fingerprint(0) != tiny.fingerprint(1)


def test_unknown_model_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        tiny.model_dir("tiny-gpt", out=tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        tiny.main(["tiny-gpt", "--out", str(tmp_path)])
    assert excinfo.value.code == 2


def test_cli_lists_and_reuses(
    tiny_models: dict[str, Path], tiny_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tiny.main(["--list", "--out", str(tiny_root)]) == 0
    listed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [row[0] for row in listed] == list(tiny.MODELS)
    assert all(row[2] == "cached" for row in listed)

    assert tiny.main(["tiny-qwen2.5-vl", "--out", str(tiny_root)]) == 0
    name, folder, state = capsys.readouterr().out.strip().split("\t")
    assert (name, Path(folder), state) == ("tiny-qwen2.5-vl", tiny_models["tiny-qwen2.5-vl"], "cached")


def test_cli_builds_into_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny.main(["tiny-grounding-dino", "--out", str(tmp_path), "--no-check"]) == 0
    name, folder, state = capsys.readouterr().out.strip().split("\t")
    assert name == "tiny-grounding-dino" and state.startswith("built in")
    assert tiny.is_complete(Path(folder)) and Path(folder).parent == tmp_path
