"""Validate KEDA and Prometheus Operator objects against their CRD schemas; run by the tools venv.

``python crd_schemas.py FILE...`` prints one line per problem and exits 1 when there is any. The
schemas are the CRDs' OpenAPI schemas as generated pydantic models (cloudcoil-models-*, pinned in
deploy/tools/). Those models ignore unknown fields, so an object must also survive a round trip
unchanged: a misspelt or misplaced field is dropped by the model and shows up as a difference.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pydantic
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as monitoring

MODELS: dict[tuple[str, str], Any] = {
    ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PodMonitor"): monitoring.PodMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule,
}


def _differences(original: Any, round_trip: Any, path: str) -> list[str]:
    if isinstance(original, dict) and isinstance(round_trip, dict):
        problems = [f"{path}.{key}: unknown field" for key in original if key not in round_trip]
        for key in original.keys() & round_trip.keys():
            problems += _differences(original[key], round_trip[key], f"{path}.{key}")
        return problems
    if isinstance(original, list) and isinstance(round_trip, list) and len(original) == len(round_trip):
        return [
            p
            for i, (a, b) in enumerate(zip(original, round_trip, strict=True))
            for p in _differences(a, b, f"{path}[{i}]")
        ]
    return [] if original == round_trip else [f"{path}: {original!r} became {round_trip!r}"]


def check(obj: dict[str, Any]) -> list[str]:
    model = MODELS.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if model is None:
        return []
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    try:
        parsed = model.model_validate(obj)
    except pydantic.ValidationError as exc:
        return [f"{name}: {error['loc']}: {error['msg']}" for error in exc.errors()]
    round_trip = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"{name}: {problem}" for problem in _differences(obj, round_trip, "")]


def main(paths: list[str]) -> int:
    problems, checked = [], 0
    for path in paths:
        for obj in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")):
            if obj and (obj.get("apiVersion"), obj.get("kind")) in MODELS:
                checked += 1
                problems += check(obj)
    print("\n".join(problems) if problems else f"{checked} objects valid")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
