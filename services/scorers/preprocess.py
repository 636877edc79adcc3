"""Image preprocessing of the scorer models in plain numpy/PIL/scipy, without the transformers processor.

The transformers image processors validate their arguments, convert formats and loop per image in
Python on every call: on the small crops of one region that costs more than an onnxruntime forward
pass of a small model. These functions do the same arithmetic directly, with the constants read
once from the model's processor, and are checked against it (``tests/scorers/test_preprocess.py``):

* PIL-resize processors (Grounding DINO, CLIP, SigLIP): PIL resize of the uint8 image with the
  processor's resampling filter, then ``(x · rescale − mean) / std``;
* OWLv2: rescale, pad bottom/right to a square with 0, Gaussian anti-aliasing and a linear zoom
  (scipy, exactly as ``Owlv2ImageProcessor.resize``), clip to the input range, normalize.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class PixelPreprocessor:
    """Images -> ``(B, 3, size, size)`` float32 pixel values, as the model's processor makes them."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float
    resample: Image.Resampling
    owlv2: bool = False  # pad to a square, then the anti-aliased scipy zoom instead of a PIL resize

    @classmethod
    def of(cls, image_processor: Any) -> PixelPreprocessor:
        """The constants of a transformers image processor."""
        return cls(
            mean=_three(image_processor.image_mean),
            std=_three(image_processor.image_std),
            rescale=float(image_processor.rescale_factor),
            resample=Image.Resampling(int(image_processor.resample or Image.Resampling.BILINEAR)),
            owlv2=type(image_processor).__name__.startswith("Owlv2"),
        )

    def __call__(self, images: Sequence[Image.Image], size: int) -> FloatArray:
        """One batch of pixel values (every image resized to ``size x size``, no centre crop)."""
        if self.owlv2:
            return np.stack([self._owlv2(image, size) for image in images])
        return np.stack([self._pil(image, size) for image in images])

    @cached_property
    def _table(self) -> FloatArray:
        """``(3, 256)``: the normalized value of every uint8 level per channel, computed as the
        processor computes it (rescale in float64 to float32, then normalize in float32)."""
        levels = (np.arange(256, dtype=np.float64) * self.rescale).astype(np.float32)
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        table: FloatArray = ((levels[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)
        return table

    def _pil(self, image: Image.Image, size: int) -> FloatArray:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        channels = np.asarray(rgb.resize((size, size), self.resample)).transpose(2, 0, 1)
        table = self._table
        return np.stack([table[c][channels[c]] for c in range(3)])

    def _owlv2(self, image: Image.Image, size: int) -> FloatArray:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        scaled = (np.asarray(rgb).astype(np.float64) * self.rescale).astype(np.float32).transpose(2, 0, 1)
        height, width = scaled.shape[1:]
        side = max(height, width)
        square = np.zeros((3, side, side), dtype=np.float32)
        square[:, :height, :width] = scaled
        factor = side / size
        sigma = max(0.0, (factor - 1.0) / 2.0)
        filtered = ndimage.gaussian_filter(square, (0.0, sigma, sigma), cval=0, mode="mirror")
        # Channel by channel: the same linear zoom as on (H, W, 3) with factor 1 on channels, 2x faster.
        zoom = (1.0 / factor, 1.0 / factor)
        zoomed = np.stack(
            [ndimage.zoom(c, zoom, order=1, mode="mirror", cval=0, grid_mode=True) for c in filtered]
        )
        clipped = np.clip(zoomed, square.min(), square.max())
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        normalized: FloatArray = ((clipped - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
        return normalized


def _three(values: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(values, int | float):
        return (float(values),) * 3
    a, b, c = (float(v) for v in values)
    return (a, b, c)
