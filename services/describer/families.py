"""Model families: coordinate format, prompt templates and the exact image resize of each policy family.

SPEC §2 "Prompting": (a) the cropped region image, optionally with object references, (b) the full
image with the region box written in the model's own coordinate format. Templates are per family,
have stable ids (``<family prefix>/<mode>/v<n>``, recorded in every record's lineage) and are
configurable (:meth:`ModelFamily.with_templates`).

The frame the model sees must be known exactly, or parsed boxes cannot be mapped back to the full
image. So the describer resizes the image itself, with the same rule as the family's processor, and
sends the resized frame: the processor then leaves it unchanged.

* Qwen2.5-VL / Qwen2-VL: ``smart_resize`` — both sides multiples of 28 (patch 14 x merge 2), total
  pixels within ``[min_pixels, max_pixels]``, aspect ratio kept as closely as possible. An image that
  already satisfies this is a fixed point, which is what makes the processor a no-op. Qwen2.5-VL
  writes absolute pixels of this frame; Qwen2-VL 0–1000 bins of it.
* Ferret/Shikra/LLaVA-style bracket models: a fixed square (336 x 336 by default), stretched as their
  CLIP processors do; 0–999 bins are relative, so stretching keeps them exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from services.core.boxes import Box
from services.core.formats import CoordinateFormat, render_box
from spr.v1 import describer_pb2

REFS_PLACEHOLDER = "{refs}"
BOX_PLACEHOLDER = "{box}"


class PromptKind(str, Enum):
    """The three prompt modes of SPEC §2 (proto ``PromptMode`` without UNSPECIFIED)."""

    CROP = "crop"
    CROP_REFS = "crop-refs"
    FULL_BOX = "full-box"

    @property
    def proto(self) -> describer_pb2.PromptMode.ValueType:
        """The proto enum value."""
        return _TO_PROTO[self]

    @property
    def crops(self) -> bool:
        """True when the model sees the cropped region rather than the full image."""
        return self is not PromptKind.FULL_BOX

    @classmethod
    def from_proto(cls, mode: describer_pb2.PromptMode.ValueType) -> PromptKind | None:
        """None for PROMPT_MODE_UNSPECIFIED (and unknown values from newer clients)."""
        return _FROM_PROTO.get(int(mode))


def parse_prompt_kinds(text: str) -> tuple[PromptKind, ...]:
    """``"crop, full-box"`` -> the prompt modes, in order (the stage setting and ``spr-main`` read it);
    ValueError naming the known modes for an empty list or an unknown mode."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    known = [kind.value for kind in PromptKind]
    if not parts or any(part not in known for part in parts):
        raise ValueError(f"expected a comma-separated list of {known}, got {text!r}")
    return tuple(PromptKind(part) for part in parts)


_TO_PROTO = {
    PromptKind.CROP: describer_pb2.PROMPT_MODE_CROP,
    PromptKind.CROP_REFS: describer_pb2.PROMPT_MODE_CROP_WITH_REFS,
    PromptKind.FULL_BOX: describer_pb2.PROMPT_MODE_FULL_IMAGE_BOX,
}
_FROM_PROTO = {int(v): k for k, v in _TO_PROTO.items()}


# --- resizing ---------------------------------------------------------------------------------------


class ResizeError(ValueError):
    """The image cannot be brought to a frame the family accepts (e.g. an extreme aspect ratio)."""


@dataclass(frozen=True)
class SmartResize:
    """Qwen2-VL's ``smart_resize`` (transformers ``image_processing_qwen2_vl``), reimplemented exactly.

    Reimplemented rather than imported so that the describer does not import transformers.
    """

    factor: int = 28
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    max_aspect_ratio: float = 200.0

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        """``(frame_width, frame_height)`` the model sees for a ``width x height`` image."""
        if width <= 0 or height <= 0:
            raise ResizeError(f"cannot resize an empty {width}x{height} image")
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            raise ResizeError(
                f"aspect ratio of {width}x{height} is above {self.max_aspect_ratio:g}, "
                "which the model refuses"
            )
        f = self.factor
        h_bar, w_bar = round(height / f) * f, round(width / f) * f
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h_bar = max(f, math.floor(height / beta / f) * f)
            w_bar = max(f, math.floor(width / beta / f) * f)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / f) * f
            w_bar = math.ceil(width * beta / f) * f
        return w_bar, h_bar


@dataclass(frozen=True)
class FixedResize:
    """Stretch to a fixed size (CLIP-style processors of LLaVA/Ferret without padding)."""

    width: int = 336
    height: int = 336

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        """Always the fixed size; the input size only has to be non-empty."""
        if width <= 0 or height <= 0:
            raise ResizeError(f"cannot resize an empty {width}x{height} image")
        return self.width, self.height


Resize = SmartResize | FixedResize


# --- templates --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTemplate:
    """One instruction template; ``{refs}`` and ``{box}`` are its only placeholders.

    Placeholders are replaced literally (not ``str.format``), so templates may show JSON with braces.
    """

    template_id: str
    kind: PromptKind
    text: str

    def __post_init__(self) -> None:
        needed = {PromptKind.CROP_REFS: REFS_PLACEHOLDER, PromptKind.FULL_BOX: BOX_PLACEHOLDER}.get(self.kind)
        if needed is not None and needed not in self.text:
            raise ValueError(f"template {self.template_id!r} ({self.kind.value}) must contain {needed}")
        if not self.template_id.strip():
            raise ValueError("a template needs a non-empty id")

    def render(self, refs: Sequence[str] = (), box: str = "") -> str:
        """The instruction: refs joined by commas, box markup as given."""
        return self.text.replace(REFS_PLACEHOLDER, ", ".join(refs)).replace(BOX_PLACEHOLDER, box)


def object_references(categories: Iterable[str]) -> list[str]:
    """Distinct, non-empty category names in first-seen order ("it contains: person, bicycle")."""
    seen: dict[str, None] = {}
    for category in categories:
        name = " ".join(category.split())
        if name:
            seen.setdefault(name, None)
    return list(seen)


# --- families ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    """Everything the describer must know about a policy family to prompt it and read its boxes."""

    name: str
    template_prefix: str
    coordinate_format: CoordinateFormat
    resize: Resize
    templates: Mapping[str, PromptTemplate] = field(default_factory=dict)
    defaults: Mapping[PromptKind, str] = field(default_factory=dict)

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        """The frame the model sees for an image (or crop) of ``width x height`` pixels."""
        return self.resize.frame_size(width, height)

    def template(self, template_id: str = "", kind: PromptKind | None = None) -> PromptTemplate:
        """A template by id, or the default one of ``kind``; KeyError names what is known."""
        if template_id:
            if template_id not in self.templates:
                raise KeyError(
                    f"template {template_id!r} is not one of the {self.name} templates: "
                    + ", ".join(sorted(self.templates))
                )
            return self.templates[template_id]
        if kind is None:
            raise KeyError("neither a template id nor a prompt mode was given")
        return self.templates[self.defaults[kind]]

    def render_region(self, region_in_frame: Box, frame_w: int, frame_h: int) -> str:
        """The region box written the way this family writes boxes (for full-image prompts)."""
        return render_box(region_in_frame, self.coordinate_format, frame_w, frame_h)

    def with_templates(
        self, extra: Iterable[PromptTemplate], defaults: Mapping[PromptKind, str] | None = None
    ) -> ModelFamily:
        """A copy with more (or replaced) templates and optionally other default template ids."""
        templates = dict(self.templates)
        templates.update((t.template_id, t) for t in extra)
        chosen = {**self.defaults, **(defaults or {})}
        for kind, template_id in chosen.items():
            if template_id not in templates:
                raise ValueError(
                    f"default {kind.value} template {template_id!r} is not a {self.name} template"
                )
            actual = templates[template_id].kind
            if actual is not kind:
                raise ValueError(f"default {kind.value} template {template_id!r} has mode {actual.value}")
        return replace(self, templates=templates, defaults=chosen)

    def with_pixel_bounds(self, min_pixels: int | None, max_pixels: int | None) -> ModelFamily:
        """A copy whose smart resize uses these bounds (must match the processor Triton runs)."""
        if not isinstance(self.resize, SmartResize):
            if min_pixels is not None or max_pixels is not None:
                raise ValueError(f"{self.name} resizes to a fixed size; pixel bounds do not apply")
            return self
        resize = replace(
            self.resize,
            min_pixels=self.resize.min_pixels if min_pixels is None else min_pixels,
            max_pixels=self.resize.max_pixels if max_pixels is None else max_pixels,
        )
        if resize.min_pixels > resize.max_pixels:
            raise ValueError(f"min_pixels {resize.min_pixels} > max_pixels {resize.max_pixels}")
        return replace(self, resize=resize)


def _family(
    name: str, prefix: str, fmt: CoordinateFormat, resize: Resize, texts: Mapping[PromptKind, str]
) -> ModelFamily:
    templates = [PromptTemplate(f"{prefix}/{kind.value}/v1", kind, text) for kind, text in texts.items()]
    return ModelFamily(
        name=name,
        template_prefix=prefix,
        coordinate_format=fmt,
        resize=resize,
        templates={t.template_id: t for t in templates},
        defaults={t.kind: t.template_id for t in templates},
    )


_QWEN25_BOXES = (
    "Then locate every object you mentioned and output their bounding boxes in JSON format, as a list of "
    '{"bbox_2d": [x1, y1, x2, y2], "label": "<object>"}.'
)
_QWEN2_BOXES = "Give the bounding box of every object you mention."
_FERRET_BOXES = "Right after each object you mention, give its coordinates as [x1, y1, x2, y2]."

QWEN25_VL = _family(
    "qwen2.5-vl",
    "qwen25-vl",
    CoordinateFormat.QWEN25_JSON,
    SmartResize(),
    {
        PromptKind.CROP: f"Describe this image in detail. {_QWEN25_BOXES}",
        PromptKind.CROP_REFS: f"Describe this image in detail. It contains: {{refs}}. {_QWEN25_BOXES}",
        PromptKind.FULL_BOX: f"Describe the region {{box}} of this image in detail. {_QWEN25_BOXES}",
    },
)
QWEN2_VL = _family(
    "qwen2-vl",
    "qwen2-vl",
    CoordinateFormat.QWEN2_TOKENS,
    SmartResize(),
    {
        PromptKind.CROP: f"Describe this image in detail. {_QWEN2_BOXES}",
        PromptKind.CROP_REFS: f"Describe this image in detail. It contains: {{refs}}. {_QWEN2_BOXES}",
        PromptKind.FULL_BOX: f"Describe the region {{box}} of this image in detail. {_QWEN2_BOXES}",
    },
)
FERRET = _family(
    "ferret",
    "ferret",
    CoordinateFormat.BRACKET_999,
    FixedResize(),
    {
        PromptKind.CROP: f"Describe this image in detail. {_FERRET_BOXES}",
        PromptKind.CROP_REFS: f"Describe this image in detail. It contains: {{refs}}. {_FERRET_BOXES}",
        PromptKind.FULL_BOX: f"Describe the region {{box}} in detail. {_FERRET_BOXES}",
    },
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (QWEN25_VL, QWEN2_VL, FERRET)}


def get_family(name: str) -> ModelFamily:
    """The built-in family ``name`` (``qwen2.5-vl``, ``qwen2-vl``, ``ferret``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
