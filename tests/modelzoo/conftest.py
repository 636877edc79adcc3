"""Fixtures for the model zoo tests: every tiny model, built once per session into a temporary cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.modelzoo import tiny


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache root, so the tests neither depend on nor touch the user's cache."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_models(tiny_root: Path) -> dict[str, Path]:
    """name -> folder of every tiny model (each one built, checked and cached by the factory)."""
    return tiny.ensure_models(out=tiny_root)
