"""One-machine mode: every pipeline stage as its own OS process, started, killed and restarted by name.

The stages are the same commands a Kubernetes Deployment runs (``python -m <module>``), configured by
the same environment variables, so one-machine mode exercises exactly the production wiring: the
broker and Triton come from :mod:`services.devstack`, every other service is a :class:`ServiceSet`
member. Killing a member with SIGKILL (:meth:`ServiceSet.kill`) is how the fault tests and the
``--chaos`` option of the main job prove that nothing is lost.

:func:`read_decisions` reads the ``pairs`` topic from the beginning without a consumer group (so it
never moves anybody's offsets) and groups the decisions by region: the ledger that says whether every
region ended in exactly one decision.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from services.common.kafka_io import KafkaSettings, M, Topic, UndecodableRecord, decode_record
from services.common.topics import PAIRS, REGIONS, stream_topics
from services.core.refine import REFINE_IOU_THRESHOLD
from services.devstack.process import ManagedProcess, log_tail
from spr.v1 import pairs_pb2


@dataclass(frozen=True)
class ServiceSpec:
    """How to start one service process: its module (``python -m``) and its environment."""

    name: str
    module: str
    env: Mapping[str, str] = field(default_factory=dict)
    args: Sequence[str] = ()

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]


class ServiceSet:
    """Named service processes sharing one base environment; logs go to ``<workdir>/<name>.log``."""

    def __init__(self, workdir: Path, base_env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.base_env = dict(os.environ if base_env is None else base_env)
        self._specs: dict[str, ServiceSpec] = {}
        self._processes: dict[str, ManagedProcess] = {}

    def add(self, spec: ServiceSpec, *, start: bool = True) -> None:
        """Register ``spec`` (replacing a stopped one of the same name) and start it."""
        if spec.name in self._processes and self._processes[spec.name].is_running():
            raise RuntimeError(f"service {spec.name} is running; stop it before replacing it")
        self._specs[spec.name] = spec
        env = {**self.base_env, **spec.env}
        self._processes[spec.name] = ManagedProcess(spec.argv(), log_path=self.log_path(spec.name), env=env)
        if start:
            self._processes[spec.name].start()

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def pid(self, name: str) -> int | None:
        return self._processes[name].pid

    def is_running(self, name: str) -> bool:
        return self._processes[name].is_running()

    def kill(self, name: str) -> None:
        """SIGKILL the service (no drain, no clean-up: a crash)."""
        self._processes[name].kill()

    def stop(self, name: str, grace: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), SIGKILL after ``grace`` seconds; returns the exit status."""
        return self._processes[name].stop(grace=grace)

    def start(self, name: str) -> None:
        self._processes[name].start()

    def check_alive(self, finite: Sequence[str] = ()) -> None:
        """Raise with the log tail of the first service that died on its own.

        ``finite`` services (a sampler with a region budget) may finish; only a failure counts for them.
        """
        for name, process in self._processes.items():
            code = process.returncode()
            if code is not None and not (name in finite and code == 0):
                raise RuntimeError(
                    f"service {name} exited with status {code}; log {self.log_path(name)}:\n"
                    + log_tail(self.log_path(name))
                )

    def stop_all(self, grace: float = 30.0) -> None:
        """Stop every service, last started first (consumers before the producers they feed)."""
        for name in reversed(list(self._processes)):
            self._processes[name].stop(grace=grace)


@contextmanager
def service_set(workdir: Path, base_env: Mapping[str, str] | None = None) -> Iterator[ServiceSet]:
    services = ServiceSet(workdir, base_env)
    try:
        yield services
    finally:
        services.stop_all()


@dataclass(frozen=True)
class Pipeline:
    """The SPR stream's processes and their settings, as environment variables (the Kubernetes ConfigMaps
    set the same names): describer stage -> localization stage ∥ semantic stage -> pair builder, fed by
    a sampler. Backend settings are given without their service prefix, e.g. ``{"BACKEND": "minilm"}``.
    """

    policy: Path
    family: str
    run_id: str
    samples: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 40
    prompt_modes: str = "crop,crop-refs,full-box"
    adapter: str = "latest"
    lambda_sem: float = 0.8
    delta: float = 0.05
    refine_iou: float = REFINE_IOU_THRESHOLD
    localization_backend: Mapping[str, str] = field(default_factory=lambda: {"BACKEND": "mllm"})
    semantic_backend: Mapping[str, str] = field(default_factory=lambda: {"BACKEND": "minilm"})
    describer_concurrency: int = 8
    pair_timeout_s: float = 600.0  # one machine: a region's scores may queue behind minutes of grounding

    def stage_specs(self, kafka: KafkaSettings, triton_grpc_url: str) -> list[ServiceSpec]:
        """The consumer stages, in start order."""
        return [
            ServiceSpec("describer", "services.describer.stage", self._describer_env(kafka, triton_grpc_url)),
            ServiceSpec(
                "localization",
                "services.scorers.localization.stage",
                self._localization_env(kafka, triton_grpc_url),
            ),
            ServiceSpec("semantic", "services.scorers.semantic.stage", self._semantic_env(kafka)),
            ServiceSpec("pairs", "services.pairs", self._pairs_env(kafka)),
        ]

    def sampler_spec(
        self,
        kafka: KafkaSettings,
        dataset: Path,
        total: int,
        *,
        image_root: Path | None = None,
        seed: int = 0,
    ) -> ServiceSpec:
        """A sampler that produces the run's regions up to position ``total`` (it resumes), then exits.

        Relative image file names resolve against ``image_root``, by default the dataset file's folder.
        """
        env = {
            "BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "DATASET": str(dataset),
            "IMAGE_ROOT": str(image_root or dataset.parent),
            "RUN_ID": self.run_id,
            "SEED": str(seed),
            "MAX_REGIONS": str(total),
            "RATE": "0",
            "METRICS_PORT": "0",
            **_api_version(kafka, "API_VERSION"),
        }
        return ServiceSpec("sampler", "services.sampler.producer", _prefixed("SPR_SAMPLER_", env))

    def _processor_config(self) -> dict[str, str]:
        for name in ("processor_config.json", "preprocessor_config.json"):
            if (self.policy / name).is_file():
                return {"PROCESSOR_CONFIG": str(self.policy / name)}
        return {}

    def _describer_env(self, kafka: KafkaSettings, triton_grpc_url: str) -> dict[str, str]:
        env = {
            "TRITON_URL": triton_grpc_url,
            "POLICY_MODEL_ID": str(self.policy),
            "MODEL_FAMILY": self.family,
            "RUN_ID": self.run_id,
            "SAMPLING__NUM_SAMPLES": str(self.samples),
            "SAMPLING__TEMPERATURE": str(self.temperature),
            "SAMPLING__MAX_NEW_TOKENS": str(self.max_new_tokens),
            "STAGE__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "STAGE__ADAPTER": self.adapter,
            "STAGE__PROMPT_MODES": self.prompt_modes,
            "STAGE__CONCURRENCY": str(self.describer_concurrency),
            "STAGE__METRICS_PORT": "0",
            "PORT": "0",
            "METRICS_PORT": "0",
            **self._processor_config(),
            **_api_version(kafka, "STAGE__API_VERSION"),
        }
        return _prefixed("SPR_DESCRIBER_", env)

    def _localization_env(self, kafka: KafkaSettings, triton_grpc_url: str) -> dict[str, str]:
        env = {
            "MLLM__TRITON_URL": triton_grpc_url,
            "MLLM__FAMILY": self.family,
            **{f"MLLM__{k}": v for k, v in self._processor_config().items()},
            "STAGE__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "STAGE__METRICS_PORT": "0",
            "PORT": "0",
            "METRICS_PORT": "0",
            **_api_version(kafka, "STAGE__API_VERSION"),
            **self.localization_backend,
        }
        return _prefixed("SPR_LOCALIZATION_", env)

    def _semantic_env(self, kafka: KafkaSettings) -> dict[str, str]:
        env = {
            "STAGE__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "STAGE__METRICS_PORT": "0",
            "PORT": "0",
            "METRICS_PORT": "0",
            **_api_version(kafka, "STAGE__API_VERSION"),
            **self.semantic_backend,
        }
        return _prefixed("SPR_SEMANTIC_", env)

    def _pairs_env(self, kafka: KafkaSettings) -> dict[str, str]:
        env = {
            "BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "RUN_ID": self.run_id,
            "LAMBDA_SEM": str(self.lambda_sem),
            "DELTA": str(self.delta),
            "REFINE_IOU": str(self.refine_iou),
            "TIMEOUT_S": str(self.pair_timeout_s),
            "METRICS_PORT": "0",
            **_api_version(kafka, "API_VERSION"),
        }
        return _prefixed("SPR_PAIRS_", env)


def _prefixed(prefix: str, env: Mapping[str, str]) -> dict[str, str]:
    return {prefix + name: value for name, value in env.items()}


def _api_version(kafka: KafkaSettings, name: str) -> dict[str, str]:
    """The broker quirk pin (noida needs 2.0), in the settings' dotted spelling; nothing when unpinned."""
    return {name: ".".join(str(p) for p in kafka.api_version)} if kafka.api_version else {}


@dataclass
class DecisionLedger:
    """Decisions read from ``pairs``, by region; duplicates (same region, same run) are kept visible."""

    by_region: dict[str, list[pairs_pb2.PairDecision]] = field(default_factory=lambda: defaultdict(list))
    undecodable: int = 0

    def regions(self) -> set[str]:
        return set(self.by_region)

    def pair_ids(self) -> set[str]:
        return {d.pair.pair_id for ds in self.by_region.values() for d in ds if d.HasField("pair")}

    def duplicates(self) -> int:
        """Decisions beyond the first per region (at-least-once re-emissions after a crash)."""
        return sum(len(ds) - 1 for ds in self.by_region.values())

    def conflicting(self) -> list[str]:
        """Regions whose repeated decisions differ: these would break idempotency downstream."""
        return [
            region
            for region, ds in self.by_region.items()
            if len({d.SerializeToString(deterministic=True) for d in ds}) > 1
        ]


def read_decisions(
    kafka: KafkaSettings, topic: Topic[pairs_pb2.PairDecision], run_id: str | None = None
) -> DecisionLedger:
    """Every decision in ``topic`` up to its current end (of ``run_id`` when given)."""
    ledger = DecisionLedger()
    for record in _read_to_end(kafka, topic):
        decoded = decode_record(topic, record)
        if isinstance(decoded, UndecodableRecord):
            ledger.undecodable += 1
            continue
        decision = decoded.message
        if run_id is not None and decision.lineage.run_id != run_id:
            continue
        ledger.by_region[decision.region_id].append(decision)
    return ledger


def read_messages(kafka: KafkaSettings, topic: Topic[M]) -> Iterator[M]:
    """Every decodable message in ``topic`` up to its current end (undecodable ones are skipped)."""
    for record in _read_to_end(kafka, topic):
        decoded = decode_record(topic, record)
        if not isinstance(decoded, UndecodableRecord):
            yield decoded.message


def wait_for_decisions(
    kafka: KafkaSettings,
    services: ServiceSet,
    run_id: str,
    *,
    timeout: float,
    sampler: str = "sampler",
    on_progress: Callable[[int, int, DecisionLedger], None] | None = None,
) -> tuple[DecisionLedger, set[str]]:
    """Wait until the sampler has finished and every region on ``regions`` has a decision on ``pairs``.

    Returns the ledger and the sampled region ids; raises if a service dies or the deadline passes.
    """
    topics = stream_topics()
    deadline = time.monotonic() + timeout
    progress = (-1, -1)
    while True:
        services.check_alive(finite=(sampler,))
        sampling = services.is_running(sampler)
        sampled = set(read_keys(kafka, topics[REGIONS]))
        ledger = read_decisions(kafka, topics[PAIRS], run_id=run_id)
        decided = len(ledger.regions() & sampled)
        if on_progress is not None and (decided, len(sampled)) != progress:
            on_progress(decided, len(sampled), ledger)
        progress = (decided, len(sampled))
        if not sampling and sampled and decided == len(sampled):
            return ledger, sampled
        if time.monotonic() > deadline:
            raise TimeoutError(f"{decided} of {len(sampled)} sampled regions decided within {timeout:.0f}s")
        time.sleep(2)


def read_keys(kafka: KafkaSettings, topic: Topic[Any]) -> list[str]:
    """The key of every record in ``topic`` up to its current end (region ids on the stream topics)."""
    return [record.key.decode() for record in _read_to_end(kafka, topic) if record.key is not None]


def _read_to_end(kafka: KafkaSettings, topic: Topic[Any]) -> Iterator[Any]:
    consumer = KafkaConsumer(**{**kafka.common_kwargs(), "enable_auto_commit": False})
    try:
        partitions = [
            TopicPartition(topic.name, p) for p in sorted(consumer.partitions_for_topic(topic.name) or ())
        ]
        if not partitions:
            return
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < end[tp] for tp in partitions) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                yield from records
    finally:
        consumer.close()
