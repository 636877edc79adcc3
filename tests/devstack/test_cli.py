"""spr-devstack: smoke round trip, and foreground servers that stop on SIGINT/SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.devstack.cli import main
from services.devstack.process import port_is_open

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "tests" / "triton_models"


@pytest.mark.parametrize("impl", ["noida", "tansu"])
def test_smoke_round_trips_a_protobuf_record(impl: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["smoke", "--impl", impl]) == 0
    assert f"smoke {impl}: OK" in capsys.readouterr().out


def run_foreground(args: list[str], ready: str, cwd: Path, sig: signal.Signals) -> tuple[str, str]:
    """Start ``spr-devstack ARGS``, wait for its ready line, send ``sig``; return (ready line, output)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.devstack.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    try:
        assert proc.stdout is not None
        line = ""
        deadline = time.monotonic() + 90
        while ready not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert ready in line, f"no ready line; exit {proc.poll()}"
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        return line, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_broker_command_prints_the_address_and_stops_on_sigint(tmp_path: Path) -> None:
    line, rest = run_foreground(["broker", "--port", "0"], "broker ready:", tmp_path, signal.SIGINT)
    match = re.search(r"bootstrap_servers=127\.0\.0\.1:(\d+)", line)
    assert match, line
    assert "broker stopped" in rest
    assert not port_is_open("127.0.0.1", int(match.group(1)))
    assert (tmp_path / ".spr" / "broker" / "data" / "kafka.json").exists()  # noida saved its data


def test_triton_command_prints_the_addresses_and_stops_on_sigterm(tmp_path: Path) -> None:
    args = ["triton", "--model-repository", str(REPO), "--model", "iou_matrix", "--workdir", str(tmp_path)]
    line, rest = run_foreground(args, "tritonserver ready:", tmp_path, signal.SIGTERM)
    match = re.search(r"grpc=127\.0\.0\.1:(\d+)", line)
    assert match, line
    assert "tritonserver stopped" in rest
    assert not port_is_open("127.0.0.1", int(match.group(1)))
