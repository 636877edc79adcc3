"""Fixtures of the shared-plumbing tests: servers on loopback with port 0, a throw-away PKI."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic_settings import SettingsConfigDict

from services.common.grpc_server import GrpcServer, build_server, make_channel
from services.common.settings import GrpcServerSettings
from tests.common.certs import Pki, make_pki
from tests.common.servicers import REGISTER


class _TestServerSettings(GrpcServerSettings):
    """A prefix of its own, so that no real SPR_* variable of the environment leaks into tests."""

    model_config = SettingsConfigDict(env_prefix="SPR_COMMONTEST_")


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPR_CONFIG_FILE", raising=False)


@pytest.fixture
def start_server() -> Iterator[Callable[..., GrpcServer]]:
    """Factory: build and start a test server with settings overrides; all are stopped at teardown."""
    started: list[GrpcServer] = []

    def start(**overrides: Any) -> GrpcServer:
        values: dict[str, Any] = {"port": 0, "metrics_port": 0, "grace_period_s": 0.0, "max_workers": 4}
        values.update(overrides)
        server = build_server(_TestServerSettings(**values), REGISTER, component="commontest")
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace=0)


@pytest.fixture
def channel_to() -> Iterator[Callable[..., grpc.Channel]]:
    """Factory: a client channel to a server (closed at teardown)."""
    channels: list[grpc.Channel] = []

    def connect(server: GrpcServer, **kwargs: Any) -> grpc.Channel:
        channel = make_channel(f"127.0.0.1:{server.port}", **kwargs)
        channels.append(channel)
        return channel

    yield connect
    for channel in channels:
        channel.close()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CA, server and client certificates for the TLS tests (made once per session)."""
    return make_pki(Path(tmp_path_factory.mktemp("pki")))
