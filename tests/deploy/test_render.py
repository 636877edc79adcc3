"""Each overlay renders with kustomize and holds every part of the deployment, hardened."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.deploy.manifests import OVERLAYS, REPO, of_kind, pod_specs, rendered

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEPLOYMENTS = {
    "spr-triton",
    "spr-describer",
    "spr-describer-stage",
    "spr-localization",
    "spr-localization-stage",
    "spr-semantic",
    "spr-semantic-stage",
    "spr-pair-builder",
    "spr-sampler",
    "spr-admin",
}
SCALED_STAGES = {"spr-describer-stage", "spr-localization-stage", "spr-semantic-stage", "spr-pair-builder"}


def _names(objects: list[dict[str, Any]], kind: str) -> set[str]:
    return {o["metadata"]["name"] for o in of_kind(objects, kind)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_holds_every_part(overlay: str) -> None:
    objects = rendered(overlay)
    assert _names(objects, "Deployment") == DEPLOYMENTS
    assert _names(objects, "CronJob") == {"spr-trainer"}
    assert _names(objects, "ScaledObject") == SCALED_STAGES
    assert {o["spec"]["scaleTargetRef"]["name"] for o in of_kind(objects, "ScaledObject")} == SCALED_STAGES
    assert _names(objects, "PodDisruptionBudget") | {"spr-sampler"} >= DEPLOYMENTS
    assert {"spr-adapters", "spr-models", "spr-datasets"} <= _names(objects, "PersistentVolumeClaim")
    assert _names(objects, "Kafka") == {"spr"}
    for kind in (
        "KafkaNodePool",
        "NetworkPolicy",
        "PodMonitor",
        "ServiceMonitor",
        "PrometheusRule",
        "Secret",
    ):
        assert of_kind(objects, kind), f"{overlay} has no {kind}"
    assert "spr-grafana-dashboard" in _names(objects, "ConfigMap")
    services = _names(objects, "Service")
    assert {"spr-triton", "spr-describer", "spr-localization", "spr-semantic", "spr-admin"} <= services


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_lives_in_the_spr_namespace(overlay: str) -> None:
    for obj in rendered(overlay):
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "spr", f"{obj['kind']}/{obj['metadata']['name']}"


def _check_container(where: str, container: dict[str, Any]) -> None:
    security = container.get("securityContext", {})
    assert security.get("readOnlyRootFilesystem") is True, where
    assert security.get("allowPrivilegeEscalation") is False, where
    assert security.get("capabilities", {}).get("drop") == ["ALL"], where
    resources = container.get("resources", {})
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound}"
    assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])}, f"{where}: writable /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_read_only_without_service_links(overlay: str) -> None:
    for where, spec in pod_specs(rendered(overlay)):
        # Service links would inject SPR_DESCRIBER_PORT=tcp://... and break the settings.
        assert spec.get("enableServiceLinks") is False, where
        assert spec.get("automountServiceAccountToken") is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert "emptyDir" in volumes["tmp"], where
        for container in spec["containers"]:
            _check_container(where, container)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_are_the_projects_entry_points(overlay: str) -> None:
    scripts = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
    for where, spec in pod_specs(rendered(overlay)):
        for container in spec["containers"]:
            command = container.get("command")
            if command is None:  # Triton: the image's tritonserver entrypoint
                assert "triton" in container["image"], where
            elif command[0] == "/bin/sh":
                invoked = " ".join(container["args"]).split()[0]
                assert invoked in scripts, f"{where} runs {invoked}, not an entry point"
            else:
                assert command[0] in scripts, f"{where} runs {command[0]}, not an entry point"


def _gpu(container: dict[str, Any]) -> str | None:
    return container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")


def test_gpu_prod_puts_triton_and_the_trainer_on_gpus() -> None:
    specs = dict(pod_specs(rendered("gpu-prod")))
    for where in ("Deployment/spr-triton", "CronJob/spr-trainer"):
        assert _gpu(specs[where]["containers"][0]) == 1, where
    triton = next(
        o for o in of_kind(rendered("gpu-prod"), "Deployment") if o["metadata"]["name"] == "spr-triton"
    )
    assert triton["spec"]["replicas"] >= 2


def test_dev_needs_no_gpu_and_runs_one_replica() -> None:
    objects = rendered("dev")
    for where, spec in pod_specs(objects):
        assert all(_gpu(c) is None for c in spec["containers"]), where
        assert "tolerations" not in spec, where
    assert all(o["spec"]["replicas"] == 1 for o in of_kind(objects, "Deployment"))
    assert all(o["spec"]["maxReplicaCount"] == 1 for o in of_kind(objects, "ScaledObject"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_is_ready_only_when_its_models_are(overlay: str) -> None:
    triton = dict(pod_specs(rendered(overlay)))["Deployment/spr-triton"]["containers"][0]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {p["containerPort"] for p in triton["ports"]} == {8000, 8001, 8002}
