"""The semantic scorer's image-text model for the world: CLIP architecture, contrastive training from scratch.

Pairs are (crop of one visible object, its phrase "striped red circle"), from the world's training
images; the loss is CLIP's own symmetric InfoNCE (`CLIPModel(..., return_loss=True)`). The model is the
`tiny-clip` recipe's architecture and tokenizer (`services.modelzoo.recipes.build_clip`), saved with
`save_pretrained` and loaded by `services.modelzoo.loading.load_clip`, which the semantic scorer uses.
Crops are preprocessed by the scorer's own `PixelPreprocessor` (stretched to the tower's square), so
the model is trained on exactly the pixels it will score.

Quality check: top-1 phrase retrieval on held-out crops among every phrase the world can produce.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.modelzoo.loading import load_clip
from services.modelzoo.recipes import build_clip
from services.scorers.preprocess import PixelPreprocessor
from services.world.build import WorldFiles
from services.world.referring import MIN_VISIBLE
from services.world.scenes import COLORS, SHAPES, TEXTURES, object_phrase


@dataclass(frozen=True)
class ClipRecipe:
    name: str = "spr-clip"
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 5e-4
    seed: int = 0
    pad: float = 0.1  # crops grow by this share of the box on each side, as region crops hold context

    def fingerprint(self, world: WorldFiles, sources: str) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        digest.update(world.annotations.read_bytes())
        digest.update(sources.encode())
        return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Crop:
    image: Image.Image
    phrase: str


def object_crops(world: WorldFiles, split: str, pad: float) -> list[Crop]:
    """One crop per visible object of the split's images (splits as in the REC files)."""
    coco = json.loads(world.annotations.read_text())
    split_ids = {image["id"] for image in json.loads(world.rec[split].read_text())["images"]}
    images = {image["id"]: image for image in coco["images"] if image["id"] in split_ids}
    folder = world.annotations.parent
    crops = []
    opened: dict[int, Image.Image] = {}
    for ann in coco["annotations"]:
        attributes = ann["attributes"]
        if ann["image_id"] not in images or attributes["visible_fraction"] < MIN_VISIBLE:
            continue
        if ann["image_id"] not in opened:
            with Image.open(folder / images[ann["image_id"]]["file_name"]) as image:
                opened[ann["image_id"]] = image.convert("RGB")
        x, y, w, h = ann["bbox"]
        box = (x - pad * w, y - pad * h, x + w + pad * w, y + h + pad * h)
        crop = opened[ann["image_id"]].crop(tuple(round(v) for v in box))
        crops.append(
            Crop(crop, object_phrase(attributes["color"], attributes["shape"], attributes["texture"]))
        )
    return crops


def all_phrases() -> list[str]:
    return [object_phrase(c, s, t) for c in COLORS for s in SHAPES for t in TEXTURES]


class _Batcher:
    """Pixels through the scorer's preprocessing and texts padded as the scorer pads them."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.size = int(model.config.vision_config.image_size)
        self.pixels = PixelPreprocessor.of(processor.image_processor)
        self.tokenizer = processor.tokenizer

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.pixels(images, self.size)))

    def texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def train_clip(
    recipe: ClipRecipe, world: WorldFiles, out: Path, say: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Build, train and save the model into `out`; returns its metrics (held-out retrieval accuracy)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        build_clip(out)
        model: Any
        model, processor = load_clip(out)
        batcher = _Batcher(model, processor)
        train_crops = object_crops(world, "train", recipe.pad)
        before = retrieval_accuracy(model, batcher, object_crops(world, "test", recipe.pad))
        seconds = _fit(model, batcher, train_crops, recipe, say)
    model.eval()
    after = retrieval_accuracy(model, batcher, object_crops(world, "test", recipe.pad))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    say(f"clip: held-out top-1 phrase retrieval {before:.1%} -> {after:.1%} ({len(all_phrases())} phrases)")
    return {"train_seconds": round(seconds, 1), "retrieval_top1_before": before, "retrieval_top1": after}


def _fit(
    model: Any, batcher: _Batcher, crops: list[Crop], recipe: ClipRecipe, say: Callable[[str], None]
) -> float:
    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    model.train()
    start = time.perf_counter()
    for step in range(recipe.steps):
        batch = rng.sample(crops, min(recipe.batch_size, len(crops)))
        loss = model(
            pixel_values=batcher.images([c.image for c in batch]),
            **batcher.texts([c.phrase for c in batch]),
            return_loss=True,
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            say(f"clip step {step + 1}: loss {loss.item():.3f}")
    return time.perf_counter() - start


@torch.inference_mode()
def retrieval_accuracy(model: Any, batcher: _Batcher, crops: Sequence[Crop]) -> float:
    """Share of crops whose most similar phrase, among all the world's phrases, is their own."""
    phrases = all_phrases()
    text = model.get_text_features(**batcher.texts(phrases))
    text = getattr(text, "pooler_output", text)
    text = torch.nn.functional.normalize(text, dim=-1)
    hits = 0
    for start in range(0, len(crops), 256):
        chunk = crops[start : start + 256]
        image = model.get_image_features(pixel_values=batcher.images([c.image for c in chunk]))
        image = torch.nn.functional.normalize(getattr(image, "pooler_output", image), dim=-1)
        best = (image @ text.T).argmax(dim=-1).tolist()
        hits += sum(phrases[b] == c.phrase for b, c in zip(best, chunk, strict=True))
    return hits / max(len(crops), 1)
