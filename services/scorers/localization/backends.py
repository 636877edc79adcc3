"""Grounding backends behind one interface: phrases + image in, boxes per phrase out (image pixels).

* Grounding DINO (default): all phrases of a region joined into one text query ``"p1 . p2 . p3 ."``,
  so one forward pass grounds every phrase of every candidate; each phrase's score of a query box is
  the max over its own tokens. Phrases that do not fit the text length go to another pass. The query
  is padded to its length rounded up to ``TEXT_PAD_MULTIPLE``, not to the model's 256: padding tokens
  are masked everywhere, so the outputs are the same (tested), and a region's ~50 tokens cost a
  fraction of a 256-token pass (exports made before the text axis was dynamic still get 256).
* OWLv2: many text queries per pass natively; phrases go in groups of ``max_queries``.

Both run on a PyTorch module or an ONNX Runtime session (:mod:`services.scorers.onnx_runtime`) with
the same preprocessing and the same input shapes (square image of ``image_size``; OWLv2: texts padded
to ``text_length``, ``max_queries`` per pass), so both paths see identical inputs.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin
from transformers.models.grounding_dino import modeling_grounding_dino as gdino

from services.modelzoo.loading import load_grounding_model, load_processor
from services.scorers.common import check_deadline
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

DINO_INPUTS = (
    "input_ids",
    "token_type_ids",
    "attention_mask",
    "pixel_mask",
    "pixel_values",
    "text_self_attention_masks",
    "position_ids",
)
OWL_INPUTS = ("input_ids", "attention_mask", "pixel_values")
_MASKS_LOCK = threading.Lock()
TOKEN_CACHE_SIZE = 4096  # phrases whose token ids are kept (a few hundred bytes each)
TEXT_PAD_MULTIPLE = 16  # DINO text widths in use: few enough that onnxruntime's per-shape plans are reused


@dataclass(frozen=True)
class Detection:
    """One grounded box in full-image pixels."""

    box: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class GroundingOptions:
    """Thresholds shared by the backends."""

    box_threshold: float = 0.35
    max_boxes_per_phrase: int = 3


class Grounder(Protocol):
    """Grounds phrases in an image region; one list of detections per phrase, in phrase order."""

    name: str

    def ground(
        self,
        image: Image.Image,
        offset: tuple[float, float],
        phrases: Sequence[str],
        deadline: float | None = None,
    ) -> list[list[Detection]]: ...

    def forward_passes(self, phrases: Sequence[str]) -> int: ...


# --- Grounding DINO -------------------------------------------------------------------------------


class DinoExportModule(torch.nn.Module):
    """Grounding DINO with its text masks as inputs: the mask builder uses ``isin``/``cummax``, which
    ONNX lacks, so the masks are computed outside the graph (same function, :func:`dino_text_masks`)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``DINO_INPUTS`` in order -> (logits (1, Q, T), pred_boxes (1, Q, 4) cxcywh in [0, 1])."""
        named = dict(zip(DINO_INPUTS, inputs, strict=True))
        masks, positions = named.pop("text_self_attention_masks"), named.pop("position_ids")
        # The model reads the module-level function: swap it for this call only, one call at a time
        # (concurrent gRPC requests must not see each other's masks).
        with _MASKS_LOCK:
            original = gdino.generate_masks_with_special_tokens_and_transfer_map
            gdino.generate_masks_with_special_tokens_and_transfer_map = lambda *_a, **_k: (masks, positions)
            try:
                out = self.model(**named)
            finally:
                gdino.generate_masks_with_special_tokens_and_transfer_map = original
        return out.logits, out.pred_boxes


def dino_text_masks(
    input_ids: npt.NDArray[np.int64], special: Sequence[int]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """The text self-attention masks and position ids Grounding DINO derives from its input ids.

    numpy port of transformers' ``generate_masks_with_special_tokens_and_transfer_map`` (tested equal
    to it): tokens attend within their phrase (the run up to the next special token), positions count
    from the previous special token.
    """
    batch, length = input_ids.shape
    is_special = np.isin(input_ids, np.asarray(special, dtype=np.int64))
    index = np.broadcast_to(np.arange(length), (batch, length))
    previous = np.maximum.accumulate(np.where(is_special, index, -1), axis=1)
    previous = np.concatenate([np.full((batch, 1), -1), previous[:, :-1]], axis=1)
    following = np.minimum.accumulate(np.where(is_special, index, length)[:, ::-1], axis=1)[:, ::-1]
    valid = (following != 0) & (following != length - 1) & (following != length)
    mask = (following[:, :, None] == following[:, None, :]) & valid[:, None, :]
    mask |= np.eye(length, dtype=np.bool_)[None]
    positions = np.where(valid, np.maximum(index - previous - 1, 0), 0).astype(np.int64)
    return mask, positions


class DinoGrounder:
    """Grounding DINO on a runner (PyTorch or ONNX Runtime)."""

    def __init__(
        self,
        runner: Runner,
        processor: ProcessorMixin,
        *,
        name: str,
        image_size: int,
        text_length: int,
        special_tokens: Sequence[int],
        options: GroundingOptions,
        pad_to_longest: bool = True,
    ) -> None:
        self.runner, self.processor, self.name = runner, processor, name
        self.image_size, self.text_length = image_size, text_length
        self.special_tokens = tuple(special_tokens)
        self.pad_to_longest = pad_to_longest  # False: always ``text_length`` (a fixed-shape graph)
        self.options = options
        tokenizer: Any = processor.tokenizer
        self.tokenizer = tokenizer
        self.dot = int(tokenizer.convert_tokens_to_ids("."))
        self.pixels = PixelPreprocessor.of(processor.image_processor)
        # Phrases recur across candidates and regions; tokenizing is per phrase, so cache it.
        self._tokens = functools.lru_cache(maxsize=TOKEN_CACHE_SIZE)(self._tokenize)

    def forward_passes(self, phrases: Sequence[str]) -> int:
        """Passes needed for these phrases (one unless they exceed the text length)."""
        return len(self._pack(phrases))

    def ground(
        self,
        image: Image.Image,
        offset: tuple[float, float],
        phrases: Sequence[str],
        deadline: float | None = None,
    ) -> list[list[Detection]]:
        """Detections per phrase, in full-image pixels (``offset`` = the crop's top-left corner)."""
        pixels = {"pixel_values": self.pixels([image], self.image_size)}
        found: list[list[Detection]] = [[] for _ in phrases]
        for group in self._pack(phrases):
            check_deadline(deadline, "between grounding passes")
            feed, spans = self._text_inputs([phrases[i] for i in group])
            feed.update(pixels)
            feed["pixel_mask"] = np.ones((1, self.image_size, self.image_size), dtype=np.int64)
            logits, boxes = self.runner(feed)
            probs = 1.0 / (1.0 + np.exp(-logits[0]))
            # A phrase's score of a box is the max over the phrase's tokens.
            scores = np.stack([probs[:, start:end].max(axis=1) for start, end in spans], axis=1)
            detections = select(scores, boxes[0], image.size, offset, self.options)
            for index, phrase_detections in zip(group, detections, strict=True):
                found[index] = phrase_detections
        return found

    def _pack(self, phrases: Sequence[str]) -> list[list[int]]:
        """Greedy groups of phrase indices whose ``[CLS] p . p . ... [SEP]`` fits the text length."""
        groups: list[list[int]] = [[]]
        used = 2  # [CLS] and [SEP]
        for i, phrase in enumerate(phrases):
            need = min(len(self._tokens(phrase)), self.text_length - 3) + 1
            if groups[-1] and used + need > self.text_length:
                groups.append([])
                used = 2
            groups[-1].append(i)
            used += need
        return [g for g in groups if g]

    def _tokenize(self, phrase: str) -> tuple[int, ...]:
        ids: list[int] = self.tokenizer(phrase, add_special_tokens=False)["input_ids"]
        return tuple(ids) or (int(self.tokenizer.unk_token_id or 0),)

    def _text_inputs(self, phrases: Sequence[str]) -> tuple[Arrays, list[tuple[int, int]]]:
        """Token ids built phrase by phrase, so every phrase's token span is known exactly."""
        ids = [int(self.tokenizer.cls_token_id)]
        spans: list[tuple[int, int]] = []
        for phrase in phrases:
            tokens = self._tokens(phrase)[: self.text_length - 3]
            spans.append((len(ids), len(ids) + len(tokens)))
            ids.extend([*tokens, self.dot])
        ids.append(int(self.tokenizer.sep_token_id))
        length = len(ids)
        padded = np.full((1, self.text_width(length)), int(self.tokenizer.pad_token_id or 0), dtype=np.int64)
        padded[0, :length] = ids
        attention = np.zeros_like(padded)
        attention[0, :length] = 1
        masks, positions = dino_text_masks(padded, self.special_tokens)
        feed: Arrays = {
            "input_ids": padded,
            "token_type_ids": np.zeros_like(padded),
            "attention_mask": attention,
            "text_self_attention_masks": masks,
            "position_ids": positions,
        }
        return feed, spans

    def text_width(self, length: int) -> int:
        """The padded width of a query of ``length`` tokens (see the module docstring)."""
        if not self.pad_to_longest:
            return self.text_length
        return min(self.text_length, -(-length // TEXT_PAD_MULTIPLE) * TEXT_PAD_MULTIPLE)


# --- OWLv2 ----------------------------------------------------------------------------------------


class OwlExportModule(torch.nn.Module):
    """OWLv2 returning plain tensors (logits (1, P, Q), pred_boxes (1, P, 4) cxcywh of the padded square)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``OWL_INPUTS`` in order."""
        out = self.model(**dict(zip(OWL_INPUTS, inputs, strict=True)))
        return out.logits, out.pred_boxes


class OwlGrounder:
    """OWLv2 on a runner; phrases go ``max_queries`` at a time (padding queries are ignored)."""

    def __init__(
        self,
        runner: Runner,
        processor: ProcessorMixin,
        *,
        name: str,
        image_size: int,
        text_length: int,
        max_queries: int,
        options: GroundingOptions,
    ) -> None:
        self.runner, self.processor, self.name = runner, processor, name
        self.image_size, self.text_length, self.max_queries = image_size, text_length, max_queries
        self.options = options
        self.tokenizer: Any = processor.tokenizer
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.pixels = PixelPreprocessor.of(processor.image_processor)
        self._query_ids = functools.lru_cache(maxsize=TOKEN_CACHE_SIZE)(self._tokenize)

    def forward_passes(self, phrases: Sequence[str]) -> int:
        """``ceil(len(phrases) / max_queries)``."""
        return -(-len(phrases) // self.max_queries)

    def ground(
        self,
        image: Image.Image,
        offset: tuple[float, float],
        phrases: Sequence[str],
        deadline: float | None = None,
    ) -> list[list[Detection]]:
        """Detections per phrase, in full-image pixels."""
        pixels = {"pixel_values": self.pixels([image], self.image_size)}
        side = float(max(image.size))  # OWLv2 pads the image to a square before resizing
        found: list[list[Detection]] = []
        for start in range(0, len(phrases), self.max_queries):
            check_deadline(deadline, "between grounding passes")
            group = list(phrases[start : start + self.max_queries])
            feed: Arrays = {**self.text_inputs(group), **pixels}
            logits, boxes = self.runner(feed)
            probs = 1.0 / (1.0 + np.exp(-logits[0, :, : len(group)]))  # padding queries dropped
            found.extend(select(probs, boxes[0], (side, side), offset, self.options, image.size))
        return found

    def text_inputs(self, queries: Sequence[str]) -> Arrays:
        """``input_ids``/``attention_mask`` of ``max_queries`` rows (padding queries are empty text)."""
        ids = np.full((self.max_queries, self.text_length), self.pad_id, dtype=np.int64)
        attention = np.zeros_like(ids)
        for row, query in enumerate([*queries, *[""] * (self.max_queries - len(queries))]):
            tokens = self._query_ids(query)
            ids[row, : len(tokens)] = tokens
            attention[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": attention}

    def _tokenize(self, query: str) -> tuple[int, ...]:
        """The query's ids, truncated to the text length as the batched tokenizer call would."""
        encoded = self.tokenizer(query, truncation=True, max_length=self.text_length)
        return tuple(int(t) for t in encoded["input_ids"])


# --- shared ---------------------------------------------------------------------------------------


def select(
    scores: FloatArray,
    boxes: FloatArray,
    frame: tuple[float, float],
    offset: tuple[float, float],
    options: GroundingOptions,
    clip_to: tuple[float, float] | None = None,
) -> list[list[Detection]]:
    """Per column of ``scores`` (P boxes x Q phrases): its best boxes above the threshold, highest first
    (ties: lower box index first), from normalized cxcywh of ``frame`` to full-image xyxy pixels."""
    top = min(options.max_boxes_per_phrase, scores.shape[0])
    order = np.argsort(-scores, axis=0, kind="stable")[:top]  # (top, Q)
    best = np.take_along_axis(scores, order, axis=0)
    cx, cy, w, h = np.moveaxis(boxes[order].astype(np.float64), -1, 0)  # each (top, Q)
    width, height = clip_to or frame
    xyxy = np.stack(
        [
            np.clip((cx - w / 2) * frame[0], 0.0, width) + offset[0],
            np.clip((cy - h / 2) * frame[1], 0.0, height) + offset[1],
            np.clip((cx + w / 2) * frame[0], 0.0, width) + offset[0],
            np.clip((cy + h / 2) * frame[1], 0.0, height) + offset[1],
        ],
        axis=-1,
    ).tolist()
    kept = (best >= options.box_threshold).T.tolist()  # (Q, top)
    confidences = best.T.tolist()
    return [
        [_detection(xyxy[r][q], confidences[q][r]) for r, keep in enumerate(row) if keep]
        for q, row in enumerate(kept)
    ]


def _detection(box: list[float], score: float) -> Detection:
    x1, y1, x2, y2 = box
    return Detection((x1, y1, x2, y2), score)


#: transformers ``model_type`` -> the backend family that runs it.
FAMILIES = {"grounding-dino": "grounding-dino", "owlv2": "owlv2", "owlvit": "owlv2"}


def family_of(model: PreTrainedModel) -> str:
    """``grounding-dino`` or ``owlv2`` from the model type."""
    model_type = str(model.config.model_type)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise ValueError(f"unsupported grounding model type {model_type!r}")


def default_shapes(family: str, model: PreTrainedModel, processor: ProcessorMixin) -> dict[str, int]:
    """Fixed input shapes of a model: image side, text length, queries per pass (OWLv2)."""
    image_processor: Any = processor.image_processor
    size = image_processor.size
    side = int(size.get("longest_edge") or size.get("height") or 800)
    if family == "grounding-dino":
        return {"image_size": side, "text_length": min(int(model.config.max_text_len), 256)}
    return {"image_size": side, "text_length": 16, "max_queries": 16}


def torch_module(family: str, model: PreTrainedModel) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The plain-tensor wrapper of a model and its input names (exported as-is to ONNX)."""
    if family == "grounding-dino":
        return DinoExportModule(model), DINO_INPUTS
    return OwlExportModule(model), OWL_INPUTS


def build_grounder(
    family: str,
    runner: Runner,
    processor: ProcessorMixin,
    shapes: dict[str, int],
    special_tokens: Sequence[int],
    name: str,
    options: GroundingOptions,
    pad_to_longest: bool = True,
) -> Grounder:
    """A grounder of ``family`` around an existing runner (``pad_to_longest``: DINO text, see
    :meth:`DinoGrounder.text_width`)."""
    if family == "grounding-dino":
        return DinoGrounder(
            runner,
            processor,
            name=name,
            image_size=shapes["image_size"],
            text_length=shapes["text_length"],
            special_tokens=special_tokens,
            options=options,
            pad_to_longest=pad_to_longest,
        )
    return OwlGrounder(
        runner,
        processor,
        name=name,
        image_size=shapes["image_size"],
        text_length=shapes["text_length"],
        max_queries=shapes["max_queries"],
        options=options,
    )


def load_torch_grounder(path: str | Path, device: str, options: GroundingOptions) -> Grounder:
    """A PyTorch grounder from a transformers checkpoint (Grounding DINO or OWLv2)."""
    model, processor = load_grounding_model(path, device)
    family = family_of(model)
    module, names = torch_module(family, model)
    special = _special_tokens(model)
    shapes = default_shapes(family, model, processor)
    return build_grounder(family, TorchRunner(module, names), processor, shapes, special, family, options)


def load_onnx_grounder(
    folder: str | Path, options: GroundingOptions, threads: int = 0, int8: bool = False
) -> Grounder:
    """An onnxruntime grounder from a folder written by ``spr-export-onnx`` (its int8 graph if asked)."""
    manifest = read_manifest(folder)
    family = str(manifest["family"])
    processor = load_processor(folder)
    runner = OnnxRunner(graph_paths(folder, int8)["model"], threads)
    shapes = {k: int(v) for k, v in manifest["shapes"].items()}
    special = [int(t) for t in manifest.get("special_tokens", [])]
    name = f"{family}-onnx{'-int8' if int8 else ''}"
    longest = manifest.get("text_padding") == "longest"  # absent from fixed-shape exports
    return build_grounder(family, runner, processor, shapes, special, name, options, longest)


def _special_tokens(model: PreTrainedModel) -> list[int]:
    tokens = getattr(getattr(model, "model", None), "special_tokens", None)
    return [int(t) for t in tokens.tolist()] if tokens is not None else []
