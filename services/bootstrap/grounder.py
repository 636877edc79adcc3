"""The localization scorer's grounding model for the world: OWLv2 architecture, trained from scratch.

SPR's localization reward needs a grounder that localizes better than the policy it judges (the paper
uses Grounding DINO). Grounding each phrase with the policy itself only rewards a description for
agreeing with the policy's own answers, which on this world are right a few times in a hundred. This
module trains the `tiny-owlv2` recipe's architecture (`services.modelzoo.recipes.build_owlv2`, with a
finer patch grid and deeper towers) the way OWL-ViT is trained:

* every patch predicts the box of the frontmost object under its centre (L1 + GIoU on cxcywh, OWLv2's
  own box head with its grid bias) and whether an object is there at all (the objectness head);
* each image's text queries are the phrases of its objects plus phrases of other objects that share an
  attribute with them ("red circle" next to "blue circle"), and a patch's logit for a query is trained
  by sigmoid cross-entropy to say whether the patch's object is named by that phrase.

Images go through the scorer's own `PixelPreprocessor` and queries through the tokenizer exactly as
`OwlGrounder` pads them, so the model is trained on the inputs it will score. It is saved with
`save_pretrained` and loaded by the scorer's torch backend (`load_torch_grounder`).

Quality check: held-out grounding accuracy, the share of visible objects whose phrase is unique in its
image and whose top-scoring box, as the scorer's `OwlGrounder` returns it, has IoU >= 0.5 with the object.
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

from services.bootstrap.train import fit_steps, warmup_cosine
from services.bootstrap.vision_pretrain import (
    ATTRIBUTES,
    IGNORE,
    PatchTargets,
    Scene,
    patch_targets,
    scenes_of,
)
from services.core.scoring import iou_matrix
from services.modelzoo.recipes import build_owlv2
from services.scorers.localization.backends import GroundingOptions, OwlGrounder, load_torch_grounder
from services.scorers.preprocess import PixelPreprocessor
from services.world.build import WorldFiles
from services.world.referring import MIN_VISIBLE
from services.world.scenes import object_phrase

BOX_L1_WEIGHT = 5.0  # DETR / OWL-ViT weights of the box terms against the classification term
BOX_GIOU_WEIGHT = 2.0


@dataclass(frozen=True)
class GrounderRecipe:
    name: str = "spr-grounder-owlv2"
    patch_size: int = 12  # 96 px -> 8 x 8 patches: most of the world's small objects cover a centre
    width: int = 64
    layers: int = 2
    # ~0.18 s a step on 2 cores (2026-11-28; 0.24 before the per-scene targets and pixels were computed
    # once): held-out grounding Acc@0.5 14 % after 600 steps, 39 % after 1500
    steps: int = 1500
    batch_size: int = 32
    queries_per_image: int = 8
    learning_rate: float = 2e-3
    seed: int = 0

    def fingerprint(self, world: WorldFiles, sources: str) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        digest.update(world.annotations.read_bytes())
        digest.update(sources.encode())
        return digest.hexdigest()[:12]


def split_scenes(world: WorldFiles, split: str) -> list[Scene]:
    """The scenes of a split's images (splits as in the REC files)."""
    coco = json.loads(world.annotations.read_text())
    folder = world.annotations.parent
    ids = {image["id"] for image in json.loads(world.rec[split].read_text())["images"]}
    images = {}
    for image in coco["images"]:
        if image["id"] in ids:
            with Image.open(folder / image["file_name"]) as opened:
                images[str(folder / image["file_name"])] = opened.convert("RGB")
    return scenes_of(coco, folder, images)


def scene_phrases(scene: Scene) -> list[str]:
    return [
        object_phrase(o.attributes["color"], o.attributes["shape"], o.attributes["texture"])
        for o in scene.objects
    ]


# --- targets ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundingTargets:
    """One image's queries and per-patch targets: (P,) objectness, (P, 4) cxcywh box, (P, Q) labels."""

    queries: list[str]
    covered: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class ScenePatches:
    """What of a scene's targets never changes: its per-patch targets and the phrase of the object under
    each patch (None: background or unreadable). Training computes it once per scene, not every step."""

    dense: PatchTargets
    owners: list[str | None]


def scene_patches(scene: Scene, grid: int) -> ScenePatches:
    dense = patch_targets(scene, grid)
    return ScenePatches(dense, [_patch_phrase(dense, patch) for patch in range(grid * grid)])


def grounding_targets(
    scene: Scene,
    grid: int,
    queries_per_image: int,
    vocabulary: Sequence[str],
    rng: random.Random,
    patches: ScenePatches | None = None,
) -> GroundingTargets:
    """The image's own phrases first, then look-alike phrases (sharing an attribute) up to the count.
    `patches` is the scene's `scene_patches` when the caller computed them already (training: once)."""
    patches = patches if patches is not None else scene_patches(scene, grid)
    own = list(dict.fromkeys(scene_phrases(scene)))[:queries_per_image]
    queries = own + _negatives(own, vocabulary, queries_per_image - len(own), rng)
    column = {query: j for j, query in enumerate(queries)}  # queries are distinct
    owner_column = torch.tensor([column.get(p, -1) if p is not None else -1 for p in patches.owners])
    labels = (owner_column[:, None] == torch.arange(len(queries))[None, :]).float()
    x1, y1, x2, y2 = patches.dense.boxes.unbind(-1)
    boxes = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)
    return GroundingTargets(queries, patches.dense.covered, boxes, labels)


def _patch_phrase(dense: PatchTargets, patch: int) -> str | None:
    if dense.covered[patch] == 0:
        return None
    values = {name: int(dense.attributes[name][patch]) for name in ATTRIBUTES}
    if IGNORE in values.values():
        return None
    return object_phrase(*(ATTRIBUTES[name][values[name]] for name in ("color", "shape", "texture")))


def _negatives(own: list[str], vocabulary: Sequence[str], count: int, rng: random.Random) -> list[str]:
    """Phrases not in the image, preferring ones that share a word with an own phrase (hard negatives)."""
    others = [p for p in vocabulary if p not in own]
    own_words = {w for p in own for w in p.split()}
    hard = [p for p in others if own_words & set(p.split())]
    picked = rng.sample(hard, min(count, len(hard)))
    rest = [p for p in others if p not in picked]
    return picked + rng.sample(rest, count - len(picked))


# --- training ---------------------------------------------------------------------------------------


class _Batcher:
    """Pixels through the scorer's preprocessing; queries tokenized and padded as `OwlGrounder` does."""

    def __init__(self, grounder: OwlGrounder) -> None:
        self.grounder = grounder
        self.pixels = PixelPreprocessor.of(grounder.processor.image_processor)

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.pixels(images, self.grounder.image_size)))

    def queries(self, per_image: Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
        ids, masks = [], []
        for queries in per_image:
            feed = self.grounder.text_inputs(queries)
            ids.append(torch.from_numpy(feed["input_ids"][: len(queries)]))
            masks.append(torch.from_numpy(feed["attention_mask"][: len(queries)]))
        return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}


def grounding_loss(outputs: Any, targets: Sequence[GroundingTargets]) -> torch.Tensor:
    covered = torch.stack([t.covered for t in targets])
    labels = torch.stack([t.labels for t in targets])
    boxes = torch.stack([t.boxes for t in targets])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    loss = bce(outputs.logits, labels) + bce(outputs.objectness_logits, covered)
    mask = covered > 0
    if mask.any():
        predicted, wanted = outputs.pred_boxes[mask], boxes[mask]
        loss = loss + BOX_L1_WEIGHT * torch.nn.functional.l1_loss(predicted, wanted)
        loss = loss + BOX_GIOU_WEIGHT * (1 - generalized_iou(predicted, wanted)).mean()
    return loss


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise GIoU of two (N, 4) cxcywh tensors."""
    a, b = _xyxy(a), _xyxy(b)
    inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(-1), (b[:, 2:] - b[:, :2]).prod(-1)
    union = area_a + area_b - inter
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).prod(-1)
    return inter / union.clamp(min=1e-9) - (hull - union) / hull.clamp(min=1e-9)


def _xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def train_grounder(
    recipe: GrounderRecipe,
    world: WorldFiles,
    out: Path,
    say: Callable[[str], None] = lambda _: None,
    log_every: int = 100,
) -> dict[str, Any]:
    """Build, train and save the model into `out`; returns its metrics (held-out grounding accuracy)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        build_owlv2(out, patch_size=recipe.patch_size, width=recipe.width, layers=recipe.layers)
        grounder = load_torch_grounder(out, "cpu", GroundingOptions())
        assert isinstance(grounder, OwlGrounder)
        model: Any = grounder.runner.module.model  # type: ignore[attr-defined]
        init_heads(model)
        test = split_scenes(world, "test")
        before = grounding_accuracy(grounder, test)
        train = split_scenes(world, "train")
        losses, seconds = _fit(model, _Batcher(grounder), train, recipe, say, log_every)
        model.eval()
    after = grounding_accuracy(grounder, test)
    model.save_pretrained(out)
    grounder.processor.save_pretrained(out)
    say(f"grounder: held-out grounding accuracy (IoU >= 0.5) {before:.1%} -> {after:.1%}")
    return {
        "recipe": asdict(recipe),
        "train_seconds": round(seconds, 1),
        "losses": losses,
        "grounding_acc50_before": before,
        "grounding_acc50": after,
    }


def init_heads(model: Any) -> None:
    """Start OWLv2's class, box and objectness heads at a trainable scale.

    transformers leaves these Linear layers at std 1 (pretrained checkpoints overwrite them), which from
    scratch gives logits in the hundreds and boxes saturated at the image corners. Hidden layers get
    Xavier weights; the last layers start near zero, so each patch's first box is its grid prior (the
    box head's bias) and every query starts undecided.
    """
    last = {"class_head.logit_shift", "class_head.logit_scale", "box_head.dense2", "objectness_head.dense2"}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[0].endswith("_head"):
                if name in last:
                    torch.nn.init.normal_(module.weight, std=0.01)
                else:
                    torch.nn.init.xavier_uniform_(module.weight)
                torch.nn.init.zeros_(module.bias)


def _fit(
    model: Any,
    batcher: _Batcher,
    scenes: list[Scene],
    recipe: GrounderRecipe,
    say: Callable[[str], None],
    log_every: int,
) -> tuple[list[tuple[int, float]], float]:
    """Train in place; returns the (step, mean loss) log and the seconds."""
    start = time.perf_counter()
    rng = random.Random(recipe.seed)
    grid = int(model.config.vision_config.image_size) // recipe.patch_size
    # What never changes per scene is computed once, not every step: patch targets and pixels.
    patches = [scene_patches(scene, grid) for scene in scenes]
    pixels = batcher.images([scene.image for scene in scenes])
    vocabulary = sorted({p for scene in scenes for p in scene_phrases(scene)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    warmup = max(recipe.steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, recipe.steps))
    model.train()

    def loss_at(step: int) -> torch.Tensor:
        batch = rng.sample(range(len(scenes)), min(recipe.batch_size, len(scenes)))
        targets = [
            grounding_targets(scenes[i], grid, recipe.queries_per_image, vocabulary, rng, patches[i])
            for i in batch
        ]
        outputs = model(
            pixel_values=pixels[batch],
            **batcher.queries([t.queries for t in targets]),
        )
        return grounding_loss(outputs, targets)

    on_log = lambda s, v: say(f"grounder step {s}: loss {v:.3f}")  # noqa: E731
    parameters = list(model.parameters())
    log = fit_steps(loss_at, parameters, optimizer, schedule, recipe.steps, log_every, on_log)
    return log, time.perf_counter() - start


@torch.inference_mode()
def grounding_accuracy(grounder: OwlGrounder, scenes: Sequence[Scene]) -> float:
    """Share of visible objects with a phrase unique in their image whose top box has IoU >= 0.5."""
    hits = total = 0
    for scene in scenes:
        phrases = scene_phrases(scene)
        wanted = [
            (phrase, obj)
            for phrase, obj in zip(phrases, scene.objects, strict=True)
            if phrases.count(phrase) == 1 and float(obj.attributes["visible_fraction"]) >= MIN_VISIBLE
        ]
        if not wanted:
            continue
        found = grounder.ground(scene.image, (0.0, 0.0), [phrase for phrase, _ in wanted])
        for (_, obj), detections in zip(wanted, found, strict=True):
            total += 1
            hits += bool(detections) and iou_matrix([detections[0].box], [obj.box])[0, 0] >= 0.5
    return hits / max(total, 1)
