"""Fixtures of the admin tests: a private broker, a real adapter store of fake-weight adapters, and
the Admin service on a loopback gRPC server.

Each test gets its own broker: the ``adapters`` topic has one fixed name (the contract), so on the
session broker the alias moves of other tests (the policy's, say) would leak into these. A noida
broker starts in ~0.1 s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.adapters.store import AdapterStore
from services.admin.logic import AdminCore
from services.admin.servicer import register_with
from services.admin.settings import AdminSettings
from services.common.grpc_server import GrpcServer, build_server, make_channel
from services.devstack.broker import BrokerImpl, BrokerProcess
from spr.v1 import adapters_pb2, adapters_pb2_grpc

BASE_MODEL = "tests/tiny-base"
GOOD = {"eval_preference_accuracy": 0.70, "eval_reward_margin": 0.50}


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """No config file of the environment leaks into a test."""
    monkeypatch.delenv("SPR_CONFIG_FILE", raising=False)


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess], broker_impl: BrokerImpl) -> BrokerProcess:
    """A private broker of the suite's kind (``SPR_TEST_BROKER``)."""
    return broker_factory(broker_impl)


def api_version_of(broker: BrokerProcess) -> str | None:
    """The broker's pinned client api_version as the admin's string setting."""
    version = broker.settings().api_version
    return ".".join(map(str, version)) if version else None


def write_fake_adapter(folder: Path, seed: int, base_model: str = BASE_MODEL) -> Path:
    """A PEFT-shaped folder with fake weights: enough for the store (digests, names), no model needed."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": base_model, "r": 8, "lora_alpha": 16}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(hashlib.sha256(str(seed).encode()).digest() * 64)
    return folder


Publish = Callable[..., adapters_pb2.AdapterManifest]


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapter-store")


@pytest.fixture
def publish(store: AdapterStore, tmp_path: Path) -> Publish:
    """``publish(round, metrics=None, base_model=...)``: a fake adapter in the store; its manifest."""

    def run(
        round_index: int, metrics: dict[str, float] | None = None, base_model: str = BASE_MODEL
    ) -> adapters_pb2.AdapterManifest:
        folder = write_fake_adapter(
            tmp_path / f"fake-{round_index}-{base_model.replace('/', '_')}", round_index
        )
        manifest = adapters_pb2.AdapterManifest(base_model_id=base_model, metrics=metrics or {})
        return store.publish(folder, manifest, round_index=round_index)

    return run


@dataclass
class AdminHarness:
    """The admin core, its server, and a stub on a channel to it."""

    core: AdminCore
    server: GrpcServer
    channel: grpc.Channel
    stub: adapters_pb2_grpc.AdminStub


def admin_settings(broker: BrokerProcess, store: AdapterStore, **overrides: Any) -> AdminSettings:
    """Settings for a loopback admin on ``broker`` and ``store`` (free port, no metrics endpoint)."""
    values: dict[str, Any] = {
        "port": 0,
        "metrics_enabled": False,
        "grace_period_s": 0.0,
        "bootstrap_servers": broker.bootstrap_servers,
        "api_version": api_version_of(broker),
        "adapter_store": str(store.root),
        "base_model_id": BASE_MODEL,
    }
    values.update(overrides)
    return AdminSettings(**values)


def start_admin(settings: AdminSettings, store: AdapterStore) -> AdminHarness:
    """Start an admin server; stop it with :func:`stop_admin`."""
    core = AdminCore(settings, store=store)
    server = build_server(settings, register_with(core))
    server.start()
    channel = make_channel(server.address)
    return AdminHarness(core, server, channel, adapters_pb2_grpc.AdminStub(channel))


def stop_admin(harness: AdminHarness) -> None:
    harness.channel.close()
    harness.server.stop(grace=0)
    harness.core.close()


@pytest.fixture
def admin_factory(broker: BrokerProcess, store: AdapterStore) -> Iterator[Callable[..., AdminHarness]]:
    """``admin_factory(**setting_overrides)`` starts an admin; all are stopped at test end."""
    started: list[AdminHarness] = []

    def start(**overrides: Any) -> AdminHarness:
        harness = start_admin(admin_settings(broker, store, **overrides), store)
        started.append(harness)
        return harness

    yield start
    for harness in started:
        stop_admin(harness)


@pytest.fixture
def admin(admin_factory: Callable[..., AdminHarness]) -> AdminHarness:
    """An admin with default settings and no replicas to scrape."""
    return admin_factory()
