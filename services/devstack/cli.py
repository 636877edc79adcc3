"""``spr-devstack``: run the local broker or tritonserver in the foreground, or smoke-test a broker.

    spr-devstack broker [--impl noida|tansu] [--data-dir DIR] [--port N]
    spr-devstack triton --model-repository PATH [--model NAME ...] [--control-mode none|poll|explicit]
    spr-devstack smoke [--impl noida|tansu]

``broker`` and ``triton`` print their addresses, then run until SIGINT/SIGTERM and stop the child by
PID. ``smoke`` starts a throw-away broker, round-trips one protobuf record through a consumer group
and exits 0 on success.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from services.common.kafka_io import ConsumedRecord, ProtoConsumer, ProtoProducer, Topic, ensure_topics
from services.devstack.broker import BrokerImpl, BrokerProcess
from services.devstack.process import StartupError
from services.devstack.triton import ModelControlMode, TritonPorts, TritonServer
from spr.v1 import common_pb2

_LOG = logging.getLogger("spr-devstack")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="spr-devstack", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    broker = sub.add_parser("broker", help="run a Kafka-protocol broker on 127.0.0.1")
    _add_impl(broker)
    broker.add_argument(
        "--workdir",
        type=Path,
        default=Path(".spr/broker"),
        help="log file and default data directory (default: %(default)s)",
    )
    broker.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="noida data directory, kept across runs (default: WORKDIR/data)",
    )
    broker.add_argument("--port", type=int, default=9092, help="0 picks a free port (default: %(default)s)")

    triton = sub.add_parser("triton", help="run the bundled tritonserver on 127.0.0.1")
    triton.add_argument("--model-repository", type=Path, required=True)
    triton.add_argument(
        "--model",
        action="append",
        default=[],
        dest="models",
        help="wait for (and in explicit mode load) this model; repeatable",
    )
    triton.add_argument(
        "--control-mode", choices=[m.value for m in ModelControlMode], default=ModelControlMode.NONE.value
    )
    for name in ("http", "grpc", "metrics"):
        triton.add_argument(f"--{name}-port", type=int, default=0, help="default: a free port")
    triton.add_argument(
        "--workdir",
        type=Path,
        default=Path(".spr/triton"),
        help="log file and backend directory (default: %(default)s)",
    )

    smoke = sub.add_parser("smoke", help="start a broker, round-trip a protobuf record, stop it")
    _add_impl(smoke)
    return parser


def _add_impl(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--impl", choices=[b.value for b in BrokerImpl], default=BrokerImpl.NOIDA.value)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spr-devstack``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kafka-python logs every connection at INFO; keep the console to our own messages.
    logging.getLogger("kafka").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        if args.command == "broker":
            return run_broker(BrokerImpl(args.impl), args.workdir, args.data_dir, args.port)
        if args.command == "triton":
            ports = TritonPorts.pick(args.http_port, args.grpc_port, args.metrics_port)
            mode = ModelControlMode(args.control_mode)
            return run_triton(args.model_repository, args.models, mode, args.workdir, ports)
        return smoke(BrokerImpl(args.impl))
    except (StartupError, FileNotFoundError) as exc:
        print(f"spr-devstack: {exc}", file=sys.stderr)
        return 1


def run_broker(impl: BrokerImpl, workdir: Path, data_dir: Path | None, port: int) -> int:
    """Run a broker until SIGINT/SIGTERM."""
    broker = BrokerProcess(impl, workdir=workdir, data_dir=data_dir, port=port or None)
    with _StopOnSignals() as stopping:
        broker.start()
        try:
            print(
                f"{impl.value} broker ready: bootstrap_servers={broker.bootstrap_servers} "
                f"pid={broker.pid} log={broker.log_path}",
                flush=True,
            )
            _wait(stopping, broker.is_running)
        finally:
            broker.stop()
            print(f"{impl.value} broker stopped", flush=True)
    return 0 if stopping.is_set() else 1


def run_triton(
    repository: Path, models: list[str], mode: ModelControlMode, workdir: Path, ports: TritonPorts
) -> int:
    """Run tritonserver until SIGINT/SIGTERM."""
    server = TritonServer(repository, workdir=workdir, models=models, control_mode=mode, ports=ports)
    with _StopOnSignals() as stopping:
        server.start()
        try:
            print(
                f"tritonserver ready: http={server.http_url} grpc={server.grpc_url} "
                f"metrics={server.metrics_url} pid={server.pid} log={server.log_path}",
                flush=True,
            )
            _wait(stopping, server.is_running)
        finally:
            server.stop()
            print("tritonserver stopped", flush=True)
    return 0 if stopping.is_set() else 1


def smoke(impl: BrokerImpl) -> int:
    """Start a broker, send one ``spr.v1.Region`` and read it back through a consumer group."""
    topic = Topic("spr-smoke", common_pb2.Region, partitions=2)
    sent = common_pb2.Region(region_id=f"smoke-{uuid.uuid4().hex[:8]}", image_id=42)
    started = time.monotonic()
    with BrokerProcess(impl) as broker:
        settings = broker.settings()
        ensure_topics(settings, [topic])
        with ProtoProducer(settings) as producer:
            producer.send_and_wait(topic, sent.region_id, sent)
        with ProtoConsumer(settings, "spr-smoke", [topic]) as consumer:
            received = _poll_one(consumer)
            consumer.commit()
    ok = received == sent
    print(
        f"smoke {impl.value}: {'OK' if ok else 'FAILED'} ({time.monotonic() - started:.1f}s), "
        f"sent {sent.region_id!r}, received {received.region_id if received else None!r}"
    )
    return 0 if ok else 1


def _poll_one(consumer: ProtoConsumer[common_pb2.Region], timeout: float = 30.0) -> common_pb2.Region | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in consumer.poll(timeout_ms=500):
            if isinstance(record, ConsumedRecord):
                return record.message
    return None


class _StopOnSignals:
    """Turn SIGINT/SIGTERM into an Event for the duration of a ``with`` block."""

    def __enter__(self) -> threading.Event:
        self._event = threading.Event()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self._event

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _wait(stopping: threading.Event, alive: Callable[[], bool]) -> None:
    """Block until a stop signal arrives or the child dies on its own."""
    while not stopping.wait(timeout=0.5):
        if not alive():
            print("spr-devstack: the child process exited unexpectedly; see its log", file=sys.stderr)
            return


if __name__ == "__main__":
    sys.exit(main())
