"""Procedural grounded scenes: textured shapes with clutter and occlusion, written as COCO JSON + PNGs.

Real datasets (Objects365, COCO, LVIS) need downloads; this world lets the whole SPR loop run
offline on a laptop. Every scene is a pure function of (seed, image index, config), so a world is
reproducible byte for byte and can be regenerated instead of shipped.

Objects vary in shape, colour, size and texture; later objects are drawn over earlier ones (occlusion),
and every object records how much of it stays visible, which the referring-expression split
(`services.world.referring`) uses to leave out objects nobody could point at.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
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
TEXTURES = ("plain", "striped", "dotted")
# Size words by the object's side relative to the largest side the config allows.
SIZE_WORDS = ("small", "medium", "large")

XYXY = tuple[int, int, int, int]
BoolMask = npt.NDArray[np.bool_]


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
    colors: tuple[str, ...] = field(default=tuple(COLORS), metadata={"help": "colours objects draw from"})
    shapes: tuple[str, ...] = field(default=SHAPES, metadata={"help": "shapes objects draw from"})
    textures: tuple[str, ...] = field(default=TEXTURES, metadata={"help": "fills objects draw from"})
    single_object_share: float = field(
        default=0.0,
        metadata={
            "help": "share of scenes holding exactly one object (else min..max objects): the easiest "
            "grounding case, where the box depends on the image alone, which a model learning from "
            "scratch needs to learn where things are before telling look-alikes apart (SPEC §6)"
        },
    )
    repeat_probability: float = field(
        default=0.35,
        metadata={
            "help": "chance that an object copies the colour and shape of an earlier one, so that "
            "colour and category alone are ambiguous and only position tells objects apart"
        },
    )

    def __post_init__(self) -> None:
        unknown = (set(self.colors) - set(COLORS)) | (set(self.shapes) - set(SHAPES))
        unknown |= set(self.textures) - set(TEXTURES)
        if unknown:
            raise ValueError(f"unknown colours/shapes/textures {sorted(unknown)}")
        if not (0 < self.min_objects <= self.max_objects and 0 < self.min_size <= self.max_size):
            raise ValueError("need 0 < min_objects <= max_objects and 0 < min_size <= max_size")
        if not 0.0 <= self.single_object_share <= 1.0:
            raise ValueError(f"single_object_share must lie in [0, 1], got {self.single_object_share}")
        if self.max_size > min(self.width, self.height):
            raise ValueError(f"max_size {self.max_size} does not fit a {self.width}x{self.height} image")


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its amodal box (xyxy pixels), attributes and the visible share of its pixels."""

    box: XYXY
    color: str
    shape: str
    texture: str
    size: str
    visible_fraction: float

    @property
    def category(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0)

    def attributes(self) -> dict[str, Any]:
        return {
            "color": self.color,
            "shape": self.shape,
            "texture": self.texture,
            "size": self.size,
            "visible_fraction": round(self.visible_fraction, 4),
        }


def object_phrase(color: str, shape: str, texture: str) -> str:
    """How descriptions name an object: "red circle", or "striped red circle" when it is textured."""
    return f"{color} {shape}" if texture == "plain" else f"{texture} {color} {shape}"


def category_ids() -> dict[str, int]:
    """COCO category id of every `colour shape` name (stable: independent of the config)."""
    names = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
    return {name: i + 1 for i, name in enumerate(names)}


def box_iou(a: XYXY, b: XYXY) -> float:
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


def _shape_mask(shape: str, box: XYXY, size: tuple[int, int]) -> Image.Image:
    """The shape's pixels (mode L, 255 inside) on an image-sized canvas."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    x1, y1, x2, y2 = box
    # PIL includes the far edge; the box's x2/y2 are exclusive like COCO's x + w.
    inner = (x1, y1, x2 - 1, y2 - 1)
    if shape == "circle":
        draw.ellipse(inner, fill=255)
    elif shape == "square":
        draw.rectangle(inner, fill=255)
    elif shape == "triangle":
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=255)
    else:
        cx, cy = (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2
        draw.polygon([(cx, y1), (x2 - 1, cy), (cx, y2 - 1), (x1, cy)], fill=255)
    return mask


def _texture_layer(texture: str, color: str, box: XYXY, size: tuple[int, int]) -> Image.Image:
    """The object's fill: its colour, with darker stripes or dots for the textured fills."""
    fill = COLORS[color]
    layer = Image.new("RGB", size, fill)
    if texture == "plain":
        return layer
    mark = tuple(int(c * 0.45) for c in fill) if color != "black" else (200, 200, 200)
    draw = ImageDraw.Draw(layer)
    x1, y1, x2, y2 = box
    if texture == "striped":
        for offset in range(-(y2 - y1), x2 - x1, 5):  # diagonal stripes, 2 px wide, 5 px apart
            draw.line((x1 + offset, y2, x1 + offset + (y2 - y1), y1), fill=mark, width=2)
    else:
        for y in range(y1 + 2, y2, 5):
            for x in range(x1 + 2 + (y // 5 % 2) * 2, x2, 5):
                draw.rectangle((x, y, x + 1, y + 1), fill=mark)
    return layer


def _outline(mask: Image.Image) -> Image.Image:
    """A 1 px outline of a mask (mask minus its erosion)."""
    pixels = np.asarray(mask) > 0
    eroded = pixels.copy()
    eroded[1:, :] &= pixels[:-1, :]
    eroded[:-1, :] &= pixels[1:, :]
    eroded[:, 1:] &= pixels[:, :-1]
    eroded[:, :-1] &= pixels[:, 1:]
    return Image.fromarray(((pixels & ~eroded) * 255).astype(np.uint8), mode="L")


def _place_boxes(rng: np.random.Generator, cfg: SceneConfig) -> list[XYXY]:
    """Rejection-sample object boxes whose pairwise IoU stays under the occlusion limit."""
    # The extra draw only when the share is set, so worlds without it stay byte for byte as before.
    if cfg.single_object_share > 0 and rng.random() < cfg.single_object_share:
        count = 1
    else:
        count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    boxes: list[XYXY] = []
    for _ in range(count * 20):
        if len(boxes) == count:
            break
        w, h = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, size=2))
        x1 = int(rng.integers(0, cfg.width - w + 1))
        y1 = int(rng.integers(0, cfg.height - h + 1))
        box = (x1, y1, x1 + w, y1 + h)
        if all(box_iou(box, other) <= cfg.max_overlap for other in boxes):
            boxes.append(box)
    return boxes


def size_word(box: XYXY, cfg: SceneConfig) -> str:
    """small / medium / large by the mean side, in thirds of the config's size range."""
    side = ((box[2] - box[0]) + (box[3] - box[1])) / 2
    third = (cfg.max_size - cfg.min_size) / 3 or 1.0
    return SIZE_WORDS[min(int((side - cfg.min_size) / third), 2)]


def _attributes(
    rng: np.random.Generator, cfg: SceneConfig, earlier: list[tuple[str, str]]
) -> tuple[str, ...]:
    """(colour, shape, texture); sometimes a repeat of an earlier colour and shape (a distractor)."""
    if earlier and rng.random() < cfg.repeat_probability:
        color, shape = earlier[int(rng.integers(len(earlier)))]
    else:
        color, shape = str(rng.choice(list(cfg.colors))), str(rng.choice(list(cfg.shapes)))
    return color, shape, str(rng.choice(list(cfg.textures)))


def render_scene(seed: int, index: int, cfg: SceneConfig) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Draw scene `index` of world `seed`; return the image and its objects (box in xyxy pixels)."""
    image, objects = render_scene_objects(seed, index, cfg)
    return image, [{"category": o.category, **o.attributes(), "box": o.box} for o in objects]


def render_scene_objects(seed: int, index: int, cfg: SceneConfig) -> tuple[Image.Image, list[SceneObject]]:
    """`render_scene` with typed objects, in drawing order (later ones occlude earlier ones)."""
    rng = np.random.default_rng([seed, index])
    size = (cfg.width, cfg.height)
    image = Image.new("RGB", size)
    _draw_background(ImageDraw.Draw(image), rng, cfg)
    owner = np.full((cfg.height, cfg.width), -1, dtype=np.int32)  # which object each pixel shows
    drawn: list[tuple[XYXY, str, str, str, int]] = []
    for box in _place_boxes(rng, cfg):
        color, shape, texture = _attributes(rng, cfg, [(c, s) for _, c, s, _, _ in drawn])
        mask = _shape_mask(shape, box, size)
        image.paste(_texture_layer(texture, color, box, size), mask=mask)
        outline = (0, 0, 0) if color != "black" else (255, 255, 255)
        image.paste(outline, mask=_outline(mask))
        pixels: BoolMask = np.asarray(mask) > 0
        owner[pixels] = len(drawn)
        drawn.append((box, color, shape, texture, int(pixels.sum())))
    objects = [
        SceneObject(box, color, shape, texture, size_word(box, cfg), _visible(owner, i, area))
        for i, (box, color, shape, texture, area) in enumerate(drawn)
    ]
    return image, objects


def _visible(owner: npt.NDArray[np.int32], index: int, area: int) -> float:
    return float((owner == index).sum()) / area if area else 0.0


def generate_world(
    out_dir: Path,
    num_images: int,
    seed: int = 0,
    cfg: SceneConfig | None = None,
    held_out_from: int | None = None,
) -> Path:
    """Write `num_images` scenes as PNGs plus a COCO `annotations.json`; return the JSON path.

    Boxes are COCO xywh in pixels. Later-drawn shapes may partly occlude earlier ones, as in
    real photos; every annotation keeps its full (amodal) box and records its visible fraction.
    Scenes from index `held_out_from` on (a held-out split) are drawn without `single_object_share`:
    the extra one-object scenes are a training curriculum, so held-out accuracy still measures the
    world's task rather than one made easier by them.
    """
    cfg = cfg or SceneConfig()
    held_out_cfg = replace(cfg, single_object_share=0.0)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    categories = category_ids()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(num_images):
        held_out = held_out_from is not None and index >= held_out_from
        image, objects = render_scene_objects(seed, index, held_out_cfg if held_out else cfg)
        file_name = f"images/{seed:04d}-{index:06d}.png"
        image.save(out_dir / file_name, format="PNG", optimize=False)
        images.append({"id": index + 1, "file_name": file_name, "width": cfg.width, "height": cfg.height})
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": categories[obj.category],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "attributes": obj.attributes(),
                }
            )
    coco = {
        "info": {"description": "SPR synthetic shapes world", "seed": seed, "config": asdict(cfg)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name} for name, cid in categories.items()],
    }
    path = out_dir / "annotations.json"
    path.write_text(json.dumps(coco, indent=1))
    return path
