"""``python -m services.admin``: configured by SPR_ADMIN_* variables, serves the API, health and
metrics, stops on SIGTERM."""

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

from services.adapters.store import AdapterStore
from services.common.grpc_server import health_status, make_channel
from services.devstack.broker import BrokerProcess
from services.devstack.process import free_port
from spr.v1 import adapters_pb2, adapters_pb2_grpc
from tests.admin.conftest import Publish, api_version_of

_REPO = Path(__file__).resolve().parents[2]


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPR_ADMIN_", "SPR_CONFIG_FILE"))}
    env.update(values, PYTHONPATH=str(_REPO))
    return env


def test_help_env_lists_the_settings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.admin", "--help-env"],
        cwd=_REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "SPR_ADMIN_REPLICA_METRICS_URLS" in result.stdout
        and "SPR_ADMIN_EVAL_GATE_TOLERANCES" in result.stdout
    )


def test_bad_configuration_exits_2_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.admin"],
        cwd=_REPO,
        env=_env(SPR_ADMIN_REPLICA_METRICS_URLS="triton:8002"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "SPR_ADMIN_REPLICA_METRICS_URLS (environment)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_python_m_services_admin_serves_and_stops_on_sigterm(
    broker: BrokerProcess, store: AdapterStore, publish: Publish
) -> None:
    version = publish(1).version
    port, metrics_port = free_port(), free_port()
    env = _env(
        SPR_ADMIN_PORT=str(port),
        SPR_ADMIN_METRICS_PORT=str(metrics_port),
        SPR_ADMIN_GRACE_PERIOD_S="1",
        SPR_ADMIN_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        SPR_ADMIN_API_VERSION=api_version_of(broker) or "",
        SPR_ADMIN_ADAPTER_STORE=str(store.root),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.admin"], cwd=_REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        with make_channel(f"127.0.0.1:{port}") as channel:
            _wait_serving(channel, timeout=30)
            stub = adapters_pb2_grpc.AdminStub(channel)
            stub.Promote(adapters_pb2.PromoteRequest(version=version, alias="latest"), timeout=30)
            listing = stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30)
            assert [m.version for m in listing.versions] == [version]
            assert dict(listing.aliases) == {"latest": version}
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            exported = response.read().decode()
        assert 'spr_admin_alias_moves_total{action="promote",alias="latest"} 1.0' in exported
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr


def _wait_serving(channel: grpc.Channel, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if health_status(channel, "spr.v1.Admin", timeout=1) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "the admin did not become SERVING"
        time.sleep(0.1)
