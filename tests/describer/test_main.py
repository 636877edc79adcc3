"""The entry points and the environment variables that configure them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.common.grpc_server import health_status, make_channel
from services.describer.families import PromptKind
from services.describer.settings import DescriberSettings
from services.devstack.process import free_port

_REPO = Path(__file__).resolve().parents[2]


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPR_DESCRIBER_", "SPR_CONFIG_FILE"))}
    env.update(values, PYTHONPATH=str(_REPO))
    return env


def test_nested_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPR_DESCRIBER_RETRY__MAX_ATTEMPTS", "6")
    monkeypatch.setenv("SPR_DESCRIBER_SAMPLING__NUM_SAMPLES", "4")
    monkeypatch.setenv("SPR_DESCRIBER_STAGE__PROMPT_MODES", "crop, full-box")
    monkeypatch.setenv("SPR_DESCRIBER_STAGE__API_VERSION", "2.0.0")
    monkeypatch.setenv("SPR_DESCRIBER_IMAGES__MAX_PIXELS", "1000000")
    monkeypatch.setenv(
        "SPR_DESCRIBER_EXTRA_TEMPLATES",
        '[{"template_id": "qwen2-vl/crop/v2", "mode": "crop", "text": "Hi."}]',
    )
    monkeypatch.setenv("SPR_DESCRIBER_DEFAULT_TEMPLATES", '{"crop": "qwen2-vl/crop/v2"}')
    monkeypatch.setenv("SPR_DESCRIBER_MODEL_FAMILY", "qwen2-vl")
    settings = DescriberSettings()
    assert settings.retry.max_attempts == 6
    assert settings.sampling.num_samples == 4
    assert settings.stage.prompt_modes == (PromptKind.CROP, PromptKind.FULL_BOX)
    assert settings.stage.kafka().api_version == (2, 0, 0)
    assert settings.images.max_pixels == 1_000_000
    assert settings.family().template(kind=PromptKind.CROP).text == "Hi."
    assert (settings.port, settings.metrics_port, settings.stage.metrics_port) == (50061, 9461, 9462)


def test_bad_configuration_exits_2_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.describer"],
        cwd=_REPO,
        env=_env(SPR_DESCRIBER_MODEL_FAMILY="gpt-vision"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "SPR_DESCRIBER_MODEL_FAMILY (environment)" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_m_services_describer_serves_health_and_metrics_and_stops_on_sigterm() -> None:
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "services.describer"],
        cwd=_REPO,
        env=_env(
            SPR_DESCRIBER_PORT=str(port),
            SPR_DESCRIBER_METRICS_PORT=str(metrics_port),
            SPR_DESCRIBER_GRACE_PERIOD_S="1",
            SPR_DESCRIBER_TRITON_URL=f"127.0.0.1:{free_port()}",
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_serving(port, timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            exported = response.read().decode()
        assert 'spr_service_info{service="describer"' in exported
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr


def _wait_serving(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with make_channel(f"127.0.0.1:{port}") as channel:
        while True:
            try:
                if (
                    health_status(channel, "spr.v1.Describer", timeout=1)
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the describer did not become SERVING"
            time.sleep(0.1)


def test_the_stage_entry_point_lists_its_settings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.describer.stage", "--help-env"],
        cwd=_REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "SPR_DESCRIBER_STAGE" in result.stdout
