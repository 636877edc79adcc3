"""The external validators: Kubernetes schemas, CRD schemas, hadolint and checkov, all pinned.

Strimzi's Kafka, KafkaNodePool and KafkaTopic have no schema available offline (Strimzi publishes its
CRDs only in its repository and release artefacts, not in any package index): kubernetes-validate
reports them as schema-less, which the first test allows for exactly these kinds; test_topics.py
checks the KafkaTopics against the code instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import OVERLAYS, REPO, of_kind, rendered, rendered_file, run_tool

KUBERNETES_VERSION = "1.33.0"
#: CRD kinds kubernetes-validate has no schema for; validated by crd_schemas.py or (Strimzi) not at all.
CRD_KINDS = {
    "Kafka",
    "KafkaNodePool",
    "KafkaTopic",
    "ScaledObject",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
}
CRD_CHECKER = Path(__file__).with_name("crd_schemas.py")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_the_kubernetes_schema(overlay: str, tmp_path: Path) -> None:
    result = run_tool(
        "kubernetes-validate", "--strict", "-k", KUBERNETES_VERSION, rendered_file(overlay, tmp_path)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    schemaless = set(re.findall(r"Couldn't find schema for kind (\w+)", result.stdout + result.stderr))
    assert schemaless <= CRD_KINDS, f"built-in kinds without a schema: {schemaless - CRD_KINDS}"
    validated = {o["kind"] for o in rendered(overlay)} - schemaless
    assert {"Deployment", "CronJob", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= validated


def test_keda_and_prometheus_objects_validate_against_their_crds(tmp_path: Path) -> None:
    result = run_tool("python", CRD_CHECKER, *(rendered_file(overlay, tmp_path) for overlay in OVERLAYS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.match(r"\d+ objects valid", result.stdout)


def test_crd_check_rejects_an_unknown_field(tmp_path: Path) -> None:
    scaled = of_kind(rendered("dev"), "ScaledObject")[0]
    broken = {**scaled, "spec": {**scaled["spec"], "coolDownPeriod": 30}}  # the field is cooldownPeriod
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    result = run_tool("python", CRD_CHECKER, path)
    assert result.returncode == 1
    assert "coolDownPeriod: unknown field" in result.stdout


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = run_tool("hadolint", "--config", REPO / ".hadolint.yaml", REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_root_image(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = run_tool("hadolint", "--config", REPO / ".hadolint.yaml", dockerfile)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout


def _privileged_pod(tmp_path: Path) -> Path:
    """A pod checkov must reject: the run's control that its checks are on."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bad", "namespace": "spr"},
        "spec": {"containers": [{"name": "main", "image": "x:1", "securityContext": {"privileged": True}}]},
    }
    path = tmp_path / "control" / "privileged-pod.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(pod), encoding="utf-8")
    return path


def test_checkov_passes_on_the_manifests_and_the_dockerfile(tmp_path: Path) -> None:
    control = _privileged_pod(tmp_path)
    files = [*(rendered_file(overlay, tmp_path) for overlay in OVERLAYS), REPO / "Dockerfile", control]
    args = [arg for path in files for arg in ("-f", path)]
    result = run_tool(
        "checkov",
        *args,
        "--framework",
        "kubernetes",
        "dockerfile",
        "--output",
        "json",
        "--config-file",
        REPO / ".checkov.yaml",
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {report["check_type"] for report in reports} == {"kubernetes", "dockerfile"}
    failed = [check for report in reports for check in report["results"]["failed_checks"]]
    control_ids = {check["check_id"] for check in failed if check["file_path"].endswith(control.name)}
    assert {"CKV_K8S_16", "CKV_K8S_22"} <= control_ids  # privileged; no read-only root filesystem
    findings = [
        f"{check['check_id']} {check['resource']} ({check['file_path']}): {check['check_name']}"
        for check in failed
        if not check["file_path"].endswith(control.name)
    ]
    assert findings == [], "checkov findings (fix them, or justify a skip on the resource):\n" + "\n".join(
        findings
    )
