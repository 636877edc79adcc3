"""Procedural grounded scenes: coloured shapes with clutter and occlusion, written as COCO JSON + PNGs.

Real datasets (Objects365, COCO, LVIS) need downloads; this world lets the whole SPR loop run
offline on a laptop. Every scene is a pure function of (seed, image index), so a world is
reproducible byte for byte and can be regenerated instead of shipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn; every field is a knob of the world's difficulty."""

    width: int = field(default=96, metadata={"help": "image width in pixels"})
    height: int = field(default=96, metadata={"help": "image height in pixels"})
    min_objects: int = field(default=1, metadata={"help": "fewest objects in a scene"})
    max_objects: int = field(default=7, metadata={"help": "most objects in a scene"})
    min_size: int = field(default=10, metadata={"help": "smallest object side in pixels"})
    max_size: int = field(default=36, metadata={"help": "largest object side in pixels"})
    max_overlap: float = field(
        default=0.3, metadata={"help": "largest IoU allowed between two objects (occlusion)"}
    )
    clutter: int = field(default=12, metadata={"help": "unannotated background strokes per image"})


def _category_ids() -> dict[str, int]:
    names = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
    return {name: i + 1 for i, name in enumerate(names)}


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _draw_background(draw: ImageDraw.ImageDraw, rng: np.random.Generator, cfg: SceneConfig) -> None:
    """Muted noise strokes: clutter that is not an object, so detectors must not fire on colour alone."""
    base = tuple(int(v) for v in rng.integers(90, 170, size=3))
    draw.rectangle((0, 0, cfg.width, cfg.height), fill=base)
    for _ in range(cfg.clutter):
        x, y = rng.integers(0, cfg.width), rng.integers(0, cfg.height)
        dx, dy = rng.integers(-20, 21, size=2)
        shade = tuple(int(c + rng.integers(-25, 26)) for c in base)
        draw.line((int(x), int(y), int(x + dx), int(y + dy)), fill=shade, width=int(rng.integers(1, 3)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color: str) -> None:
    x1, y1, x2, y2 = box
    fill = COLORS[color]
    outline = (0, 0, 0) if color != "black" else (255, 255, 255)
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline)
    elif shape == "triangle":
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=fill, outline=outline)
    else:
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill, outline=outline)


def _place_boxes(rng: np.random.Generator, cfg: SceneConfig) -> list[tuple[int, int, int, int]]:
    """Rejection-sample object boxes whose pairwise IoU stays under the occlusion limit."""
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(count * 20):
        if len(boxes) == count:
            break
        w, h = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, size=2))
        x1 = int(rng.integers(0, cfg.width - w + 1))
        y1 = int(rng.integers(0, cfg.height - h + 1))
        box = (x1, y1, x1 + w, y1 + h)
        if all(_iou(box, other) <= cfg.max_overlap for other in boxes):
            boxes.append(box)
    return boxes


def render_scene(seed: int, index: int, cfg: SceneConfig) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Draw scene `index` of world `seed`; return the image and its objects (box in xyxy pixels)."""
    rng = np.random.default_rng([seed, index])
    image = Image.new("RGB", (cfg.width, cfg.height))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, rng, cfg)
    objects = []
    for box in _place_boxes(rng, cfg):
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        _draw_shape(draw, shape, box, color)
        objects.append({"category": f"{color} {shape}", "color": color, "shape": shape, "box": box})
    return image, objects


def generate_world(out_dir: Path, num_images: int, seed: int = 0, cfg: SceneConfig | None = None) -> Path:
    """Write `num_images` scenes as PNGs plus a COCO `annotations.json`; return the JSON path.

    Boxes are COCO xywh in pixels. Later-drawn shapes may partly occlude earlier ones, as in
    real photos; every annotation keeps its full (amodal) box.
    """
    cfg = cfg or SceneConfig()
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    categories = _category_ids()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(num_images):
        image, objects = render_scene(seed, index, cfg)
        file_name = f"images/{seed:04d}-{index:06d}.png"
        image.save(out_dir / file_name, format="PNG", optimize=False)
        images.append({"id": index + 1, "file_name": file_name, "width": cfg.width, "height": cfg.height})
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": categories[obj["category"]],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "attributes": {"color": obj["color"], "shape": obj["shape"]},
                }
            )
    coco = {
        "info": {"description": "SPR synthetic shapes world", "seed": seed, "config": cfg.__dict__},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name} for name, cid in categories.items()],
    }
    path = out_dir / "annotations.json"
    path.write_text(json.dumps(coco, indent=1))
    return path
