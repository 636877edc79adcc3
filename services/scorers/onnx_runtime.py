"""Model runners: one callable interface over a PyTorch module and an ONNX Runtime session.

Both scorers preprocess once and hand the same named numpy arrays to either runner, so the PyTorch and
onnxruntime paths differ only in the engine (which is what the parity tests and the benchmark compare).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

Arrays = dict[str, npt.NDArray[Any]]
MANIFEST = "manifest.json"


class Runner(Protocol):
    """Named inputs in, outputs (in the model's declared order) out."""

    def __call__(self, feed: Arrays) -> list[npt.NDArray[np.float32]]: ...


class TorchRunner:
    """Runs ``module(*inputs)`` without gradients; inputs are taken from the feed by ``input_names``."""

    def __init__(self, module: torch.nn.Module, input_names: Sequence[str]) -> None:
        self.module = module.eval()
        self.input_names = tuple(input_names)
        self.device = next(module.parameters()).device

    def __call__(self, feed: Arrays) -> list[npt.NDArray[np.float32]]:
        """One forward pass."""
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device) for n in self.input_names]
        with torch.inference_mode():
            outputs = self.module(*args)
        return [o.float().cpu().numpy() for o in outputs]


def providers() -> list[str]:
    """CUDA when this onnxruntime build has it (GPU machines), CPU otherwise."""
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or available


class OnnxRunner:
    """An onnxruntime session; feed keys the graph does not declare are ignored.

    Session options, measured on the small scorer graphs (``bench/bench_scoring.py``): all graph
    optimisations; one region is one run, so operators run sequentially (no inter-op pool) on
    ``threads`` intra-op threads (0 = onnxruntime's default, one per physical core).
    """

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        # No busy-waiting between runs: spinning pool threads take the cores from everything else in
        # the process (image decoding, the gRPC threads) and from other processes on a small machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers())
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, feed: Arrays) -> list[npt.NDArray[np.float32]]:
        """One session run."""
        outputs = self.session.run(None, {n: feed[n] for n in self.input_names})
        return [np.asarray(o, dtype=np.float32) for o in outputs]


def graph_paths(folder: str | Path, int8: bool = False) -> dict[str, Path]:
    """The graphs of an export folder by role (``model``; ``vision``/``text``), int8 ones if asked."""
    manifest = read_manifest(folder)
    key = "graphs_int8" if int8 else "graphs"
    if key not in manifest:
        raise FileNotFoundError(f"{folder} has no int8 graphs: export it with spr-export-onnx --int8")
    return {role: Path(folder) / str(name) for role, name in manifest[key].items()}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The export manifest written by :mod:`services.scorers.onnx_export`."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {MANIFEST}: export it with spr-export-onnx first")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
