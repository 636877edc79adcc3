"""A service process started the real way (run_service) stops gracefully on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from services.common.grpc_server import health_status, make_channel

_SERVICE = textwrap.dedent(
    """
    import sys
    from pydantic_settings import SettingsConfigDict
    from services.common.grpc_server import run_service
    from services.common.settings import GrpcServerSettings
    from tests.common.servicers import register_test_services

    class SigtestSettings(GrpcServerSettings):
        model_config = SettingsConfigDict(env_prefix="SPR_SIGTEST_")

    run_service(SigtestSettings, lambda settings: register_test_services, sys.argv[1:])
    """
)
_REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_serving(port: int, timeout: float) -> None:
    channel = make_channel(f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if (
                    health_status(channel, "spr.v1.Admin", timeout=1)
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "service did not become SERVING"
            time.sleep(0.05)
    finally:
        channel.close()


def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "SPR_SIGTEST_PORT": str(port),
        "SPR_SIGTEST_METRICS_ENABLED": "false",
        "SPR_SIGTEST_GRACE_PERIOD_S": "1",
        "PYTHONPATH": str(_REPO),
    }
    env.pop("SPR_CONFIG_FILE", None)
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVICE], cwd=_REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_serving(port, timeout=20)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "SIGTERM received: shutting down" in stderr


def test_invalid_config_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "SPR_SIGTEST_PORT": "eighty", "PYTHONPATH": str(_REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _SERVICE], cwd=_REPO, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "SPR_SIGTEST_PORT (environment): Input should be a valid integer" in result.stderr
    assert "Traceback" not in result.stderr
