"""Every SPR_* variable the deployment sets is a setting the code reads (one-machine mode's names).

pydantic-settings ignores unknown variables (the services only warn), so without this test a typo in
a ConfigMap would silently leave a default in force.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import typing
from typing import Any

import pytest
from pydantic import BaseModel

import services
from services.common.settings import SprSettings
from tests.deploy.manifests import OVERLAYS, REPO, env_names, rendered

POLICY_MODEL = REPO / "services/policy/model_repository/spr_policy/1/model.py"


def _settings_classes() -> dict[str, type[SprSettings]]:
    """Env prefix -> settings class, from every ``settings`` module of the services."""
    for module in pkgutil.walk_packages(services.__path__, prefix="services."):
        if module.name.rsplit(".", 1)[-1] == "settings":
            importlib.import_module(module.name)
    found: dict[str, type[SprSettings]] = {}
    pending: list[type[SprSettings]] = [SprSettings]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.env_prefix() not in ("", "SPR_"):
            found.setdefault(cls.env_prefix(), cls)
    return found


def _policy_settings() -> set[str]:
    """SPR_POLICY_<KEY> for every key the Triton model reads (its SETTINGS tuple)."""
    tree = ast.parse(POLICY_MODEL.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SETTINGS" for t in node.targets):
            keys = ast.literal_eval(node.value)
            return {f"SPR_POLICY_{key.upper()}" for key in keys}
    raise AssertionError(f"no SETTINGS tuple in {POLICY_MODEL}")


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``X``, ``X | None``), if any."""
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _has_field(model: type[BaseModel], path: list[str]) -> bool:
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    if len(path) == 1:
        return True
    nested = _model_class(field.annotation)
    return nested is not None and _has_field(nested, path[1:])


def _unknown(names: dict[str, str]) -> list[str]:
    classes = _settings_classes()
    policy = _policy_settings()
    unknown = []
    for name, where in sorted(names.items()):
        if name.startswith("SPR_POLICY_"):
            if name not in policy:
                unknown.append(f"{name} ({where}): the Triton model reads only {sorted(policy)}")
            continue
        prefix = max((p for p in classes if name.startswith(p)), key=len, default=None)
        if prefix is None:
            unknown.append(f"{name} ({where}): no settings class has this prefix")
        elif not _has_field(classes[prefix], name.removeprefix(prefix).lower().split("__")):
            unknown.append(f"{name} ({where}): {classes[prefix].__name__} has no such field")
    return unknown


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_spr_variable_is_a_setting(overlay: str) -> None:
    names = env_names(rendered(overlay))
    assert len(names) > 30, "the deployment configures the services through SPR_* variables"
    assert _unknown(names) == []


def test_the_check_catches_a_misspelt_variable() -> None:
    bad = {"SPR_DESCRIBER_TRITON_URLL": "x", "SPR_DESCRIBER_STAGE__NOPE": "x", "SPR_POLICY_DEVIC": "x"}
    assert len(_unknown(bad)) == 3
