"""Root fixtures: real dev-stack processes (Kafka-protocol broker, tritonserver) on loopback.

* ``kafka_broker`` — session broker, noida by default; ``SPR_TEST_BROKER=tansu`` runs the whole
  suite against Tansu instead. ``tansu_broker`` is always Tansu.
* ``broker_factory`` — private brokers for tests that stop/restart/kill them (stopped at test end).
* ``triton_server`` — session factory: ``triton_server(repo, models=[...])`` starts a server, or
  returns the running one started with the same arguments (``fresh=True`` for a private one).

Every process is stopped by its PID in teardown, failing test or not. When a test fails, the logs
of the dev-stack processes alive during it are copied to ``.spr/test-logs/<test>/`` and their
tails are attached to the report.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    # kafka-python 3.0 loads its protocol schemas with deprecated importlib.resources calls (~200
    # DeprecationWarnings at import); they say nothing about this project.
    warnings.filterwarnings("ignore", r"(read|open)_text is deprecated", DeprecationWarning)
    import kafka  # noqa: F401

from services.devstack.broker import BrokerImpl, BrokerProcess
from services.devstack.process import log_tail
from services.devstack.triton import ModelControlMode, TritonServer

#: Processes whose logs are collected when a test fails: name -> object with ``log_path``.
_LIVE_LOGS: dict[str, Any] = {}

TritonFactory = Callable[..., TritonServer]
BrokerFactory = Callable[..., BrokerProcess]


def _track(name: str, process: BrokerProcess | TritonServer) -> None:
    _LIVE_LOGS[name] = process


def _untrack(name: str) -> None:
    _LIVE_LOGS.pop(name, None)


@pytest.fixture(scope="session")
def broker_impl() -> BrokerImpl:
    """Broker behind ``kafka_broker``: ``$SPR_TEST_BROKER`` (noida|tansu), noida by default."""
    return BrokerImpl(os.environ.get("SPR_TEST_BROKER", BrokerImpl.NOIDA.value))


def _session_broker(impl: BrokerImpl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(impl, workdir=tmp_path_factory.mktemp(f"broker-{impl.value}"))
    name = f"session-{impl.value}"
    _track(name, broker)
    try:
        yield broker.start()
    finally:
        broker.stop()
        _untrack(name)


@pytest.fixture(scope="session")
def kafka_broker(
    broker_impl: BrokerImpl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    """A broker shared by the session; do not stop it (use ``broker_factory`` for that)."""
    yield from _session_broker(broker_impl, tmp_path_factory)


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A Tansu broker shared by the session (memory only)."""
    yield from _session_broker(BrokerImpl.TANSU, tmp_path_factory)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Start private brokers (``broker_factory("noida")``); each is stopped when the test ends."""
    started: list[tuple[str, BrokerProcess]] = []

    def start(impl: BrokerImpl | str = BrokerImpl.NOIDA, **kwargs: Any) -> BrokerProcess:
        broker = BrokerProcess(impl, workdir=tmp_path / f"broker-{len(started)}", **kwargs)
        name = f"private-broker-{len(started)}-{broker.impl.value}"
        started.append((name, broker))
        _track(name, broker)
        return broker.start()

    try:
        yield start
    finally:
        for name, broker in started:
            broker.stop()
            _untrack(name)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonFactory]:
    """Factory of tritonservers on loopback, all stopped at the end of the session."""
    shared: dict[tuple[str, tuple[str, ...], str], TritonServer] = {}
    started: list[tuple[str, TritonServer]] = []

    def start(
        model_repository: Path,
        *,
        models: Sequence[str] = (),
        control_mode: ModelControlMode | str = ModelControlMode.NONE,
        fresh: bool = False,
    ) -> TritonServer:
        key = (str(Path(model_repository).resolve()), tuple(models), ModelControlMode(control_mode).value)
        if not fresh and key in shared and shared[key].is_running():
            return shared[key]
        name = f"triton-{len(started)}"
        server = TritonServer(
            model_repository,
            workdir=tmp_path_factory.mktemp(name),
            models=models,
            control_mode=control_mode,
        )
        started.append((name, server))
        _track(name, server)
        server.start()
        if not fresh:
            shared[key] = server
        return server

    try:
        yield start
    finally:
        for name, server in started:
            server.stop()
            _untrack(name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """On failure, attach the tails of live dev-stack logs and keep copies under .spr/test-logs."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed or not _LIVE_LOGS:
        return
    dest = item.config.rootpath / ".spr" / "test-logs" / re.sub(r"[^\w.-]+", "_", item.nodeid)
    dest.mkdir(parents=True, exist_ok=True)
    for name, process in list(_LIVE_LOGS.items()):
        log_path: Path = process.log_path
        if not log_path.exists():
            continue
        copy = dest / f"{name}.log"
        shutil.copyfile(log_path, copy)
        report.sections.append((f"{name} log ({copy})", log_tail(log_path, 30)))
