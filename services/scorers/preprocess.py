"""Image preprocessing of the scorer models in plain numpy/PIL/scipy, without the transformers processor.

The transformers image processors validate their arguments, convert formats and loop per image in
Python on every call: on the small crops of one region that costs more than an onnxruntime forward
pass of a small model. These functions do the same arithmetic directly, with the constants read
once from the model's processor, and are checked against it (``tests/scorers/test_preprocess.py``):

* PIL-resize processors (Grounding DINO, CLIP, SigLIP): PIL resize of the uint8 image with the
  processor's resampling filter, then ``(x · rescale − mean) / std``;
* OWLv2: rescale, pad bottom/right to a square with 0, Gaussian anti-aliasing and a linear zoom
  (``Owlv2ImageProcessor.resize``: scipy ``gaussian_filter`` then ``zoom``, both ``mirror``), clip to
  the input range, normalize. Blur and zoom are linear and separable, so each axis is one sparse band
  matrix (:func:`owlv2_axis_operator`, cached per size) and the resize is two sparse-dense products;
  the padding is zeros, so its columns are dropped instead of padding the image. Several times cheaper
  than the scipy passes over the padded square, equal to them within float32 rounding (~1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import sparse

FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.intp]
GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default kernel radius, in sigmas


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
        levels = self._levels
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        table: FloatArray = ((levels[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)
        return table

    def _pil(self, image: Image.Image, size: int) -> FloatArray:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        channels = np.asarray(rgb.resize((size, size), self.resample)).transpose(2, 0, 1)
        table = self._table
        return np.stack([table[c][channels[c]] for c in range(3)])

    @cached_property
    def _levels(self) -> FloatArray:
        """``(256,)``: every uint8 level rescaled as the processor does (float64 product, then float32)."""
        levels: FloatArray = (np.arange(256, dtype=np.float64) * self.rescale).astype(np.float32)
        return levels

    def _owlv2(self, image: Image.Image, size: int) -> FloatArray:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = np.asarray(rgb)
        height, width = pixels.shape[:2]
        side = max(height, width)
        # Layouts are chosen so that every product contracts the leading axis of a C-contiguous array
        # and the output comes out channel-first: no pass over the output with a 3-wide inner stride.
        scaled = self._levels[pixels.transpose(1, 2, 0)]  # (W, 3, H), rescaled by lookup
        across = owlv2_axis_operator(width, side, size) @ scaled.reshape(width, -1)  # (size_x, 3 * H)
        down = np.ascontiguousarray(across.reshape(size, 3, height).transpose(2, 1, 0))  # (H, 3, size_x)
        resized = owlv2_axis_operator(height, side, size) @ down.reshape(height, -1)  # (size_y, 3 * size_x)
        # The processor clips to the range of the padded square, whose padding is 0.
        low = 0.0 if height != width else float(scaled.min())
        np.maximum(resized, low, out=resized)  # in place: np.clip's generic path is ~3x slower
        np.minimum(resized, scaled.max(), out=resized)
        out = np.empty((3, size, size), np.float32)
        np.subtract(resized.reshape(size, 3, size).transpose(1, 0, 2), self._channel_mean, out=out)
        out /= self._channel_std
        return out

    @cached_property
    def _channel_mean(self) -> FloatArray:
        mean: FloatArray = np.asarray(self.mean, np.float32)[:, None, None]
        return mean

    @cached_property
    def _channel_std(self) -> FloatArray:
        std: FloatArray = np.asarray(self.std, np.float32)[:, None, None]
        return std


@lru_cache(maxsize=256)
def owlv2_axis_operator(length: int, side: int, size: int) -> sparse.csr_matrix:
    """One axis of OWLv2's resize of a ``side`` square to ``size``, for an image ``length`` long on it.

    The sparse ``(size, length)`` matrix (a band of ``2 * radius + 2`` per row) of the blur (scipy's
    Gaussian kernel, ``mirror``) followed by the linear ``grid_mode`` zoom (``mirror``); the columns of
    the zero padding (``>= length``) are left out. Cached: crop sizes recur, and building it costs
    about as much as applying it.
    """
    factor = side / size
    kernel = _gaussian_kernel(max(0.0, (factor - 1.0) / 2.0))
    radius = len(kernel) // 2
    coords = _mirror_coordinate((np.arange(size) + 0.5) * factor - 0.5, side)
    start = np.minimum(np.floor(coords).astype(np.intp), max(side - 2, 0))
    frac = coords - start
    # Zoom taps (start, start + 1), each the centre of a blur window of 2 * radius + 1 samples.
    centres = np.stack([start, start + 1], axis=1)[:, :, None] + np.arange(-radius, radius + 1)
    weights = (np.stack([1.0 - frac, frac], axis=1)[:, :, None] * kernel).reshape(size, -1)
    indices = _mirror_index(centres, side).reshape(size, -1)
    rows = np.broadcast_to(np.arange(size)[:, None], indices.shape)
    inside = indices < length
    operator = sparse.csr_matrix(
        (weights[inside], (rows[inside], indices[inside])), shape=(size, length), dtype=np.float64
    )  # duplicate (row, index) entries (mirror folds) are summed
    return operator.astype(np.float32)


def _gaussian_kernel(sigma: float) -> npt.NDArray[np.float64]:
    """scipy's ``_gaussian_kernel1d`` (order 0); ``[1]`` where gaussian_filter skips the axis."""
    if sigma <= 1e-15:
        return np.ones(1)
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    kernel: npt.NDArray[np.float64] = phi / phi.sum()
    return kernel


def _mirror_coordinate(coords: npt.NDArray[np.float64], side: int) -> npt.NDArray[np.float64]:
    """scipy.ndimage's ``mirror`` fold of a sample coordinate into ``[0, side - 1]``."""
    if side <= 1:
        return np.zeros_like(coords)
    period = 2.0 * (side - 1)
    folded = np.abs(coords) % period
    mirrored: npt.NDArray[np.float64] = np.where(folded > side - 1, period - folded, folded)
    return mirrored


def _mirror_index(indices: IndexArray, side: int) -> IndexArray:
    """The same fold for integer sample indices (``d c b | a b c d | c b a``)."""
    if side <= 1:
        return np.zeros_like(indices)
    period = 2 * (side - 1)
    folded = np.abs(indices) % period
    mirrored: IndexArray = np.where(folded > side - 1, period - folded, folded)
    return mirrored


def _three(values: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(values, int | float):
        return (float(values),) * 3
    a, b, c = (float(v) for v in values)
    return (a, b, c)
