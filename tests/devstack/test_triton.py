"""The bundled tritonserver on loopback: gRPC inference on the test-fixture model, stop by PID."""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient

from services.devstack.process import StartupError, pid_alive, port_is_open
from services.devstack.triton import ModelControlMode, TritonDist, TritonServer, server_env

pytestmark = pytest.mark.integration

#: Test-fixture model repository (see tests/triton_models/README.md); not product models.
REPO = Path(__file__).resolve().parents[1] / "triton_models"
MODEL = "iou_matrix"

TritonFactory = Callable[..., TritonServer]


def infer_iou(
    url: str, boxes_a: npt.NDArray[np.float32], boxes_b: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    with grpcclient.InferenceServerClient(url) as client:
        inputs = []
        for name, boxes in (("BOXES_A", boxes_a), ("BOXES_B", boxes_b)):
            tensor = grpcclient.InferInput(name, list(boxes.shape), "FP32")
            tensor.set_data_from_numpy(boxes)
            inputs.append(tensor)
        result = client.infer(MODEL, inputs, outputs=[grpcclient.InferRequestedOutput("IOU")])
        out: npt.NDArray[np.float32] | None = result.as_numpy("IOU")
        assert out is not None
        return out


def test_dist_is_found_in_the_installed_wheel() -> None:
    dist = TritonDist.locate()
    assert dist.server_binary.name == "tritonserver" and os.access(dist.server_binary, os.X_OK)
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in str(dist.stub)
    env = server_env(dist, base={"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert str(dist.libs_dir) in env["LD_LIBRARY_PATH"].split(os.pathsep)


def test_iou_model_over_grpc(triton_server: TritonFactory) -> None:
    server = triton_server(REPO, models=[MODEL])
    boxes_a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], dtype=np.float32)
    boxes_b = np.array([[0, 0, 10, 10], [0, 0, 5, 5], [20, 20, 30, 30], [10, 0, 20, 10]], dtype=np.float32)
    iou = infer_iou(server.grpc_url, boxes_a, boxes_b)
    expected = np.array(
        [
            [1.0, 0.25, 0.0, 0.0],  # identical, quarter, disjoint, edge-touching
            [25 / 175, 0.0, 0.0, 25 / 175],
        ],
        dtype=np.float32,
    )
    assert iou.dtype == np.float32 and iou.shape == (2, 4)
    np.testing.assert_allclose(iou, expected, rtol=1e-6)


def test_endpoints_are_loopback_and_metrics_are_served(triton_server: TritonFactory) -> None:
    server = triton_server(REPO, models=[MODEL])
    assert server.grpc_url.startswith("127.0.0.1:") and server.http_url.startswith("127.0.0.1:")
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        assert b"nv_inference_request_success" in response.read()


def test_explicit_mode_loads_and_unloads_models(triton_server: TritonFactory) -> None:
    server = triton_server(REPO, models=[MODEL], control_mode=ModelControlMode.EXPLICIT, fresh=True)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_model_ready(MODEL)
        client.unload_model(MODEL)
        assert not client.is_model_ready(MODEL)
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL)
    server.stop()


def test_stop_by_pid_frees_the_ports(triton_server: TritonFactory) -> None:
    server = triton_server(REPO, models=[MODEL], fresh=True)
    pid = server.pid
    assert pid is not None and pid_alive(pid)
    ports = (server.ports.http, server.ports.grpc, server.ports.metrics)
    server.stop()
    assert not pid_alive(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # no python-backend stub left behind in the server's process group
    assert not any(port_is_open("127.0.0.1", port) for port in ports)
    assert "Signal (15) received" in server.log_path.read_text()


def test_a_model_that_fails_to_load_fails_start_up_with_the_log(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    config = (REPO / MODEL / "config.pbtxt").read_text().replace(f'name: "{MODEL}"', 'name: "broken"')
    (repo / "broken" / "config.pbtxt").write_text(config)
    (repo / "broken" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('deliberately broken test model')\n"
    )
    server = TritonServer(repo, workdir=tmp_path / "work", models=["broken"], startup_timeout=60)
    with pytest.raises(StartupError, match="deliberately broken test model"):
        server.start()
    assert not server.is_running()
