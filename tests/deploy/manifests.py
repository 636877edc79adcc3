"""Rendering and reading the deployment (deploy/k8s) for the tests, through the pinned validators.

The validators live in their own venv (``./dev install`` builds ``.venv-tools`` from deploy/tools/,
``$SPR_TOOLS_VENV`` names another one): checkov's dependencies conflict with the project's pins.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "gpu-prod")
#: Kinds whose pod template runs our images (path to the pod spec inside the object).
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def tools_bin() -> Path:
    """The bin/ folder of the validators' venv; a clear failure when it was never installed."""
    venv = Path(os.environ.get("SPR_TOOLS_VENV", REPO / ".venv-tools"))
    if not (venv / "bin" / "kubectl").exists():
        pytest.fail(f"deployment validators missing in {venv}: run ./dev install (or ./dev test)")
    return venv / "bin"


def run_tool(
    name: str, *args: str | Path, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a validator from the tools venv, offline (checkov would otherwise call its cloud API)."""
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    return subprocess.run(
        [str(tools_bin() / name), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@functools.cache
def rendered_text(overlay: str) -> str:
    """``kubectl kustomize`` of one overlay (the kustomize bundled in kubectl)."""
    result = run_tool("kubectl", "kustomize", K8S / "overlays" / overlay)
    assert result.returncode == 0, f"kustomize build of {overlay} failed:\n{result.stderr}"
    return result.stdout


def rendered(overlay: str) -> list[dict[str, Any]]:
    """The rendered objects of one overlay."""
    return [doc for doc in yaml.safe_load_all(rendered_text(overlay)) if doc]


def rendered_file(overlay: str, tmp_dir: Path) -> Path:
    """The rendered overlay written to a file (for the command-line validators)."""
    path = tmp_dir / f"{overlay}.yaml"
    path.write_text(rendered_text(overlay), encoding="utf-8")
    return path


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Objects of one kind."""
    return [o for o in objects if o["kind"] == kind]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``Kind/name``, pod spec) of every workload."""
    for obj in objects:
        path = POD_SPEC_PATHS.get(obj["kind"])
        if path is None:
            continue
        spec: Any = obj
        for key in path:
            spec = spec[key]
        yield f"{obj['kind']}/{obj['metadata']['name']}", spec


def env_names(objects: list[dict[str, Any]]) -> dict[str, str]:
    """Every environment variable the deployment sets (ConfigMap keys used by envFrom, env entries)."""
    names = {
        key: f"ConfigMap/{cm['metadata']['name']}"
        for cm in of_kind(objects, "ConfigMap")
        for key in (cm.get("data") or {})
        if key.startswith("SPR_")
    }
    for where, spec in pod_specs(objects):
        for container in spec["containers"]:
            for entry in container.get("env", []):
                names[entry["name"]] = where
    return names


def load_yaml(path: Path) -> list[dict[str, Any]]:
    """All documents of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
