"""Dense grounding pretraining of the policy's vision tower, before the MLLM's SFT (LLaVA's stage 0).

Real MLLMs start from a vision tower that already knows what is where (CLIP, SigLIP, a detector's
backbone); a from-scratch policy does not. Trained end to end through the language model, a fresh
tower learns location only after thousands of steps: the answer can use a patch's position only once
attention picks the right patch, and attention has nothing to pick until patches say what they show,
so both start from zero together (measured on this world: 250 SFT steps on one-object scenes left the
loss identical with the images shuffled, i.e. the model ignored them).

This stage gives the tower that knowledge directly, in the way a detector's backbone learns it: every
patch predicts, from its own feature, whether an object covers its centre, that object's box (in the
image's 0-1 frame) and its colour, shape and texture. The heads are linear and thrown away afterwards;
what stays is a tower whose patch features already carry each object's attributes and box, so the
language model only has to learn to attend to the patch its phrase names and copy the box out.
Only the vision tower's own weights change, so the policy keeps its stock architecture.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from services.bootstrap.train import fit_steps, warmup_cosine
from services.world.scenes import COLORS, SHAPES, TEXTURES

ATTRIBUTES: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "texture": TEXTURES}
IGNORE = -100
BOX_WEIGHT = 5.0  # L1 on 0-1 coordinates is small next to the classification losses


@dataclass(frozen=True)
class SceneObject:
    """An annotated object as this stage needs it: its box in pixels and its attribute values."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    attributes: dict[str, str]


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    objects: tuple[SceneObject, ...]  # in drawing order: later ones occlude earlier ones


@dataclass(frozen=True)
class PatchTargets:
    """Per-patch targets: (..., P) objectness, (..., P, 4) box, (..., P) class index per attribute."""

    covered: torch.Tensor
    boxes: torch.Tensor
    attributes: dict[str, torch.Tensor]

    @classmethod
    def stack(cls, targets: Sequence[PatchTargets]) -> PatchTargets:
        return cls(
            torch.stack([t.covered for t in targets]),
            torch.stack([t.boxes for t in targets]),
            {name: torch.stack([t.attributes[name] for t in targets]) for name in ATTRIBUTES},
        )


def scenes_of(coco: dict[str, Any], folder: Path, images: dict[str, Image.Image]) -> list[Scene]:
    """The scenes of `images` (path -> RGB image, paths as `folder / file_name`) with their annotated
    objects in drawing order, sorted by path."""
    path_of = {image["id"]: str(folder / image["file_name"]) for image in coco["images"]}
    objects: dict[str, list[SceneObject]] = {path: [] for path in images}
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):  # ids follow drawing order
        path = path_of[ann["image_id"]]
        if path in objects:
            x, y, w, h = (float(v) for v in ann["bbox"])
            objects[path].append(SceneObject((x, y, x + w, y + h), ann["attributes"]))
    return [Scene(images[path], tuple(found)) for path, found in sorted(objects.items())]


def patch_targets(scene: Scene, grid: int) -> PatchTargets:
    """The frontmost object under each patch's centre (none: objectness 0), its box scaled to 0-1."""
    count = grid * grid
    covered = torch.zeros(count)
    boxes = torch.zeros(count, 4)
    attributes = {name: torch.full((count,), IGNORE, dtype=torch.long) for name in ATTRIBUTES}
    width, height = scene.image.size
    for patch in range(count):
        cx = (patch % grid + 0.5) * width / grid
        cy = (patch // grid + 0.5) * height / grid
        under = [o for o in scene.objects if o.box[0] <= cx < o.box[2] and o.box[1] <= cy < o.box[3]]
        if not under:
            continue
        owner = under[-1]  # drawn last, so on top
        x1, y1, x2, y2 = owner.box
        covered[patch] = 1.0
        boxes[patch] = torch.tensor([x1 / width, y1 / height, x2 / width, y2 / height])
        for name, values in ATTRIBUTES.items():
            attributes[name][patch] = values.index(owner.attributes[name])
    return PatchTargets(covered, boxes, attributes)


class DenseHeads(torch.nn.Module):
    """Linear per-patch heads: objectness, box, and one classifier per attribute."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.objectness = torch.nn.Linear(width, 1)
        self.box = torch.nn.Linear(width, 4)
        self.attributes = torch.nn.ModuleDict(
            {name: torch.nn.Linear(width, len(values)) for name, values in ATTRIBUTES.items()}
        )

    def loss(self, features: torch.Tensor, targets: PatchTargets) -> torch.Tensor:
        objectness = self.objectness(features).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(objectness, targets.covered)
        mask = targets.covered > 0
        if mask.any():
            box = torch.sigmoid(self.box(features))
            loss = loss + BOX_WEIGHT * torch.nn.functional.l1_loss(box[mask], targets.boxes[mask])
        for name, head in self.attributes.items():
            logits = head(features).flatten(0, -2)
            labels = targets.attributes[name].reshape(-1)
            loss = loss + torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE)
        return loss


def pretrain_vision_tower(
    vision_tower: torch.nn.Module,
    image_processor: Callable[..., dict[str, torch.Tensor]],
    scenes: Sequence[Scene],
    grid: int,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    on_log: Callable[[int, float], None] | None = None,
    log_every: int = 50,
) -> list[tuple[int, float]]:
    """Train the tower (and throw-away heads) on the dense targets; returns (step, mean loss) entries."""
    rng = random.Random(seed)
    config: Any = getattr(vision_tower, "config")  # noqa: B009 (typed: Module attrs are unions)
    heads = DenseHeads(int(config.hidden_size))
    parameters = list(vision_tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, steps))
    targets = [patch_targets(scene, grid) for scene in scenes]
    vision_tower.train()

    def loss_at(step: int) -> torch.Tensor:
        batch = rng.sample(range(len(scenes)), min(batch_size, len(scenes)))
        pixels = image_processor([scenes[i].image for i in batch], return_tensors="pt")["pixel_values"]
        # The patch features the MLLM reads: the last encoder layer, class token dropped ("default").
        features = vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        return heads.loss(features, PatchTargets.stack([targets[i] for i in batch]))

    log = fit_steps(loss_at, parameters, optimizer, schedule, steps, log_every, on_log)
    vision_tower.eval()
    return log
