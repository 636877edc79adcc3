"""TEST FIXTURE model for the dev-stack tests: pairwise IoU of two box sets (python backend).

Not a product model. It exists so tests can drive the real ``tritonserver`` end to end without weights;
its output is a deterministic function of its inputs, so a wiring mistake shows up as wrong values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils  # provided by the python backend at run time


def iou_matrix(boxes_a: npt.NDArray[np.float32], boxes_b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Return the ``[N, M]`` IoU matrix of ``[N, 4]`` and ``[M, 4]`` boxes given as ``x1, y1, x2, y2``."""
    a = boxes_a[:, None, :]
    b = boxes_b[None, :, :]
    inter_w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0.0, None)
    inter_h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0.0, None)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    # Degenerate boxes have zero union: define their IoU as 0 instead of dividing by zero.
    safe = np.where(union > 0.0, union, 1.0)
    return np.where(union > 0.0, inter / safe, 0.0).astype(np.float32)


class TritonPythonModel:
    """Python-backend entry point: one IoU matrix per request."""

    def execute(self, requests: list[Any]) -> list[Any]:
        """Compute ``IOU`` for every request in the batch Triton hands us."""
        responses = []
        for request in requests:
            boxes_a = pb_utils.get_input_tensor_by_name(request, "BOXES_A").as_numpy()
            boxes_b = pb_utils.get_input_tensor_by_name(request, "BOXES_B").as_numpy()
            out = pb_utils.Tensor("IOU", iou_matrix(boxes_a, boxes_b))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
