"""The Dockerfile's assumptions about the project hold (hadolint/checkov lint it in test_validators)."""

from __future__ import annotations

import re
from importlib.util import find_spec
from pathlib import Path

from tests.deploy.manifests import K8S, REPO, load_yaml

DOCKERFILE = (REPO / "Dockerfile").read_text(encoding="utf-8")


def test_the_images_the_manifests_use_are_dockerfile_targets() -> None:
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE, re.MULTILINE))
    images = {entry["name"] for entry in load_yaml(K8S / "base" / "kustomization.yaml")[0]["images"]}
    assert {name.removeprefix("spr-online/") for name in images} <= targets


def test_copied_sources_exist_and_pass_the_dockerignore() -> None:
    sources = {
        s for line in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE, re.MULTILINE) for s in line.split()
    }
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for source in sources:
        assert (REPO / source).exists(), source
        assert source in allowed, f"{source} is excluded by .dockerignore"


def test_triton_image_stub_comes_from_the_pinned_pytriton() -> None:
    # The Triton image runs the policy in Python 3.11 with the python-backend stub that the pinned
    # nvidia-pytriton wheel (Triton 2.51, as the 24.10 image) ships; the tests run the same stub.
    stub = re.search(r"site-packages/(pytriton/\S+/triton_python_backend_stub)", DOCKERFILE)
    assert stub is not None
    spec = find_spec("pytriton")
    assert spec is not None and spec.origin is not None
    assert (Path(spec.origin).parents[1] / stub.group(1)).is_file()
    assert "tritonserver:24.10-py3" in DOCKERFILE
    pinned = (REPO / "constraints.txt").read_text()
    assert "nvidia-pytriton==0.7.0" in pinned and "numpy==1.26" in pinned


def test_runtime_images_run_as_non_root_with_a_healthcheck() -> None:
    stages = re.split(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)[1:]
    runtime = [s for s in stages if s.split()[2] in ("services", "cuda", "triton")]
    assert len(runtime) == 3
    for stage in runtime:
        assert "USER 10001:10001" in stage and "HEALTHCHECK" in stage, stage.split()[2]
        assert "gcc" not in stage and "build-essential" not in stage
