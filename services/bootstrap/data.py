"""SFT examples from the world: REC answers and region descriptions with boxes, as the loop asks them.

- REC: the evaluator's own instruction (`services.evaluation.prompts`) -> the target's box.
- Region descriptions: regions drawn by the SPR region sampler (`services.core.sampler`), prompted
  with the describer's own templates (`services.describer.families`): the cropped region ("crop"), or
  the full image with the region's box written in the prompt ("full-box"). The answer names every GT
  object of the region with its box, rendered by `services.core.formats.render`.

Everything a model sees is exactly what serving and evaluation will send it, so the bootstrap teaches
the format the rest of the loop parses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image

from services.core.boxes import AnnotatedBox, Box, image_to_frame
from services.core.formats import CoordinateFormat, Mention, render
from services.core.sampler import sample_region
from services.describer.families import FERRET, ModelFamily, PromptKind
from services.evaluation.datasets import RecSample
from services.evaluation.prompts import rec_instruction

Task = Literal["rec", "describe"]


@dataclass(frozen=True)
class Example:
    task: Task
    image: Image.Image
    instruction: str
    answer: str


def loose(box: Box, slack: float, frame_w: float, frame_h: float) -> Box:
    """The box as a loose annotator draws it: every side ``slack`` of its size further out, clipped."""
    return box.pad(slack).clip(frame_w, frame_h) if slack else box


def rec_examples(
    samples: Sequence[RecSample],
    fmt: CoordinateFormat,
    images: dict[str, Image.Image],
    slack: float = 0.0,
    phrases: dict[int, str] | None = None,
) -> list[Example]:
    """One example per REC sample; the answer is the box (loosened by ``slack``, see :func:`loose`),
    as `read_prediction` reads it: alone, or after the target's phrase when ``phrases`` (annotation
    id -> phrase) are given, written as a description writes a mention ("red striped circle [...]")."""
    examples = []
    for sample in samples:
        image = images[sample.image_path]
        phrase = phrases[sample.tags["annotation_id"]] if phrases is not None else ""
        mention = Mention(phrase, loose(sample.boxes[0], slack, image.width, image.height))
        answer = render([mention], fmt, image.width, image.height).rstrip(".")
        examples.append(Example("rec", image, rec_instruction(sample.expression, fmt), answer))
    return examples


def _reading_order(objects: Sequence[AnnotatedBox]) -> list[AnnotatedBox]:
    """Top to bottom in 8 px bands, left to right within a band: a stable order the model can learn."""
    return sorted(objects, key=lambda o: (round(o.box.center[1] / 8), o.box.center[0]))


def describe_examples(
    objects_by_image: dict[str, list[AnnotatedBox]],
    images: dict[str, Image.Image],
    phrases: dict[int, str],
    per_image: int,
    seed: int,
    family: ModelFamily = FERRET,
    slack: float = 0.0,
) -> list[Example]:
    """`per_image` sampled regions per image, alternating the crop and full-box prompts; objects are
    named by `phrases` (annotation id -> phrase) with boxes loosened by ``slack`` (:func:`loose`)."""
    fmt = family.coordinate_format
    rng = np.random.default_rng(seed)
    examples = []
    for path, objects in sorted(objects_by_image.items()):
        if not objects:
            continue
        image = images[path]
        for index in range(per_image):
            region = sample_region(objects, image.width, image.height, rng)
            members = [
                replace(o, box=loose(o.box, slack, image.width, image.height))
                for o in _reading_order(region.ground_truth)
            ]
            if index % 2 == 0:
                examples.append(_crop_example(image, region.box, members, phrases, family))
            else:
                examples.append(_full_box_example(image, region.box, members, phrases, family, fmt))
    return examples


def _crop_example(
    image: Image.Image,
    region: Box,
    members: list[AnnotatedBox],
    phrases: dict[int, str],
    family: ModelFamily,
) -> Example:
    left, top = int(region.x1), int(region.y1)
    right, bottom = max(int(np.ceil(region.x2)), left + 1), max(int(np.ceil(region.y2)), top + 1)
    crop = image.crop((left, top, right, bottom))
    frame = Box(left, top, right, bottom)
    mentions = [
        Mention(
            phrases[o.annotation_id],
            image_to_frame(o.box, frame, crop.width, crop.height).clip(crop.width, crop.height),
        )
        for o in members
    ]
    answer = render(mentions, family.coordinate_format, crop.width, crop.height)
    return Example("describe", crop, family.template(kind=PromptKind.CROP).render(), answer)


def _full_box_example(
    image: Image.Image,
    region: Box,
    members: list[AnnotatedBox],
    phrases: dict[int, str],
    family: ModelFamily,
    fmt: CoordinateFormat,
) -> Example:
    box_markup = family.render_region(region, image.width, image.height)
    instruction = family.template(kind=PromptKind.FULL_BOX).render(box=box_markup)
    mentions = [Mention(phrases[o.annotation_id], o.box) for o in members]
    return Example("describe", image, instruction, render(mentions, fmt, image.width, image.height))
