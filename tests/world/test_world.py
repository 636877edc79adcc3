"""The shapes world: deterministic by seed, valid COCO, and REC expressions with exactly one answer.

Uniqueness is checked twice: by `resolve` (the code that chose the expression) and by an independent
reading of the English text written here, so a bug shared by the chooser and its resolver still shows.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from services.core.dataset import read_coco
from services.evaluation.datasets import read_spr_rec
from services.world.build import build_world, world_objects
from services.world.referring import MARGIN, MIN_VISIBLE, Descriptor, Expression, WorldObject, refer, resolve
from services.world.scenes import COLORS, SHAPES, TEXTURES, SceneConfig, generate_world, render_scene


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(out, 80, seed=5, test_fraction=0.25)
    return out


def test_same_seed_same_bytes_other_seed_other_world(world: Path, tmp_path: Path) -> None:
    build_world(tmp_path / "again", 80, seed=5, test_fraction=0.25)
    build_world(tmp_path / "other", 80, seed=6, test_fraction=0.25)
    assert _digest(tmp_path / "again") == _digest(world)
    assert _digest(tmp_path / "other") != _digest(world)


def test_annotations_are_valid_coco(world: Path) -> None:
    dataset = read_coco(world / "annotations.json", world, dataset_id="w")
    assert len(dataset.images) == 80 and not dataset.bad_records and not dataset.repaired
    coco = json.loads((world / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert {a["id"] for a in coco["annotations"]} == set(range(1, len(coco["annotations"]) + 1))
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        attributes = ann["attributes"]
        assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96 and w >= 10 and h >= 10
        assert ann["area"] == w * h
        assert names[ann["category_id"]] == f"{attributes['color']} {attributes['shape']}"
        assert attributes["texture"] in TEXTURES and 0.0 <= attributes["visible_fraction"] <= 1.0
    for image in coco["images"]:
        assert (world / image["file_name"]).is_file()


def test_world_varies_in_every_attribute_and_occludes(world: Path) -> None:
    coco = json.loads((world / "annotations.json").read_text())
    attributes = [a["attributes"] for a in coco["annotations"]]
    assert {a["color"] for a in attributes} == set(COLORS)
    assert {a["shape"] for a in attributes} == set(SHAPES)
    assert {a["texture"] for a in attributes} == set(TEXTURES)
    assert {a["size"] for a in attributes} == {"small", "medium", "large"}
    assert any(a["visible_fraction"] < 0.95 for a in attributes), "no object is ever occluded"


def test_render_scene_keeps_the_demo_api() -> None:
    image, objects = render_scene(seed=3, index=0, cfg=SceneConfig())
    assert image.size == (96, 96) and objects
    for obj in objects:
        assert obj["category"] == f"{obj['color']} {obj['shape']}" and len(obj["box"]) == 4


def test_generate_world_without_rec_still_writes_coco(tmp_path: Path) -> None:
    path = generate_world(tmp_path, 3, seed=1)
    assert path == tmp_path / "annotations.json" and len(json.loads(path.read_text())["images"]) == 3


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        SceneConfig(colors=("magenta",))
    with pytest.raises(ValueError, match="fit"):
        SceneConfig(max_size=200)


# --- referring expressions ----------------------------------------------------------------------------


def _obj(
    i: int, box: tuple[int, int, int, int], color: str, shape: str, texture: str = "plain"
) -> WorldObject:
    return WorldObject(i, box, color, shape, texture)


def test_relation_singles_out_one_of_two_look_alikes() -> None:
    left = _obj(1, (0, 0, 10, 10), "red", "circle")
    right = _obj(2, (60, 0, 70, 10), "red", "circle")
    square = _obj(3, (30, 40, 40, 50), "blue", "square")
    objects = [left, right, square]
    category = Descriptor("circle", "red")
    assert resolve(Expression(category), objects) == [left, right]  # colour + category alone: ambiguous
    assert resolve(Expression(category, "left", Descriptor("square", "blue")), objects) == [left]
    assert resolve(Expression(category, "right"), objects) == [right]
    assert Expression(category, "left", Descriptor("square")).text() == "the red circle left of the square"
    assert Expression(category, "left").text(2) == "the red circle on the left"
    assert Expression(category, "left").text(3) == "the leftmost red circle"


def test_borderline_positions_are_ambiguous_not_guessed() -> None:
    a = _obj(1, (0, 0, 10, 10), "red", "circle")
    b = _obj(2, (int(MARGIN) - 1, 30, int(MARGIN) + 9, 40), "red", "circle")  # centres closer than 2 MARGIN
    anchor = _obj(3, (2, 60, 12, 70), "blue", "square")  # centre between theirs: too close to call
    assert resolve(Expression(Descriptor("circle", "red"), "left"), [a, b, anchor]) is None
    assert (
        resolve(Expression(Descriptor("circle", "red"), "left", Descriptor("square")), [a, b, anchor]) is None
    )


_DIRECTION_WORDS = {
    "left of": "left", "right of": "right", "above": "top", "below": "bottom",
    "on the left": "left", "on the right": "right", "on top": "top", "at the bottom": "bottom",
    "leftmost": "left", "rightmost": "right", "topmost": "top", "bottommost": "bottom",
}  # fmt: skip
_NOUN = r"(?:(?P<{p}t>" + "|".join(TEXTURES) + r") )?(?:(?P<{p}c>" + "|".join(COLORS) + r") )?(?P<{p}s>\w+)"
_RELATIONAL = re.compile(
    rf"the {_NOUN.format(p='a')} (?P<rel>left of|right of|above|below) the {_NOUN.format(p='b')}"
)
_PAIR = re.compile(rf"the {_NOUN.format(p='a')} (?P<rel>on the left|on the right|on top|at the bottom)")
_EXTREME = re.compile(rf"the (?P<rel>leftmost|rightmost|topmost|bottommost) {_NOUN.format(p='a')}")
_PLAIN = re.compile(rf"the {_NOUN.format(p='a')}")


def _matching(objects: list[WorldObject], match: re.Match[str], p: str) -> list[WorldObject]:
    texture, color, shape = match[f"{p}t"], match[f"{p}c"], match[f"{p}s"]
    return [
        o for o in objects if o.shape == shape and color in (None, o.color) and texture in (None, o.texture)
    ]


def _position(o: WorldObject, direction: str) -> float:
    cx, cy = o.center
    return {"left": -cx, "right": cx, "top": -cy, "bottom": cy}[direction]


def _independent_answers(text: str, objects: list[WorldObject]) -> list[WorldObject]:
    """Read the English text without the generator's code: which objects does it describe?"""
    if match := _RELATIONAL.fullmatch(text):
        anchors = _matching(objects, match, "b")
        assert len(anchors) == 1, f"{text!r}: anchor is not unique"
        direction = _DIRECTION_WORDS[match["rel"]]
        return [
            o for o in _matching(objects, match, "a")
            if o is not anchors[0] and _position(o, direction) > _position(anchors[0], direction)
        ]  # fmt: skip
    if match := (_PAIR.fullmatch(text) or _EXTREME.fullmatch(text)):
        group = _matching(objects, match, "a")
        direction = _DIRECTION_WORDS[match["rel"]]
        best = max(_position(o, direction) for o in group)
        return [o for o in group if _position(o, direction) == best]
    match = _PLAIN.fullmatch(text)
    assert match, f"unexpected expression {text!r}"
    return _matching(objects, match, "a")


def test_every_expression_has_exactly_one_answer(world: Path) -> None:
    coco = json.loads((world / "annotations.json").read_text())
    objects = world_objects(coco)
    expressions = [
        e
        for split in ("train", "test")
        for e in json.loads((world / f"rec_{split}.json").read_text())["expressions"]
    ]
    assert len(expressions) > 150
    for item in expressions:
        scene = objects[item["image_id"]]
        answers = _independent_answers(item["text"], scene)
        assert [o.annotation_id for o in answers] == [item["annotation_id"]], item
        target = answers[0]
        assert list(target.box) == item["boxes"][0] and target.visible_fraction >= MIN_VISIBLE
    texts = {(e["image_id"], e["text"]) for e in expressions}
    assert len(texts) == len(expressions), "two objects of one image share an expression"


def test_refer_resolves_its_own_choices_and_prefers_spatial(world: Path) -> None:
    coco = json.loads((world / "annotations.json").read_text())
    kinds: dict[str, int] = {}
    for image_id, objects in world_objects(coco).items():
        for referral in refer(objects, random.Random(image_id)):
            assert resolve(referral.expression, objects) == [referral.target]
            kinds[referral.expression.kind] = kinds.get(referral.expression.kind, 0) + 1
    assert kinds["relational"] + kinds["absolute"] > 2 * kinds["attribute"] > 0


def test_split_is_by_image_and_needs_disambiguation(world: Path) -> None:
    train, test = (read_spr_rec(world / f"rec_{split}.json") for split in ("train", "test"))
    assert train and test
    assert not {s.image_path for s in train} & {s.image_path for s in test}
    samples = train + test
    ambiguous = [s for s in samples if s.tags["category_ambiguous"]]
    assert len(ambiguous) >= 0.25 * len(samples), (
        "too few expressions where colour and category are ambiguous"
    )
    assert {s.tags["kind"] for s in samples} == {"attribute", "absolute", "relational"}


def test_held_out_images_are_the_last_ones(world: Path) -> None:
    test = json.loads((world / "rec_test.json").read_text())
    assert [image["id"] for image in test["images"]] == list(range(61, 81))


def test_single_object_share_makes_one_object_scenes() -> None:
    cfg = SceneConfig(max_objects=5, single_object_share=0.5)
    counts = [len(render_scene(seed=2, index=i, cfg=cfg)[1]) for i in range(60)]
    singles = sum(c == 1 for c in counts) / len(counts)
    assert 0.4 <= singles <= 0.8  # half by the share, plus the 1-object draws of the rest
    assert max(counts) > 1
    with pytest.raises(ValueError, match="single_object_share"):
        SceneConfig(single_object_share=1.5)


def test_single_object_scenes_are_a_training_curriculum_only(tmp_path: Path) -> None:
    build_world(tmp_path, 40, seed=1, cfg=SceneConfig(single_object_share=1.0), test_fraction=0.25)
    coco = json.loads((tmp_path / "annotations.json").read_text())
    counts = {image["id"]: 0 for image in coco["images"]}
    for ann in coco["annotations"]:
        counts[ann["image_id"]] += 1
    assert all(counts[i] == 1 for i in range(1, 31))  # training images: all single by the share
    assert any(counts[i] > 1 for i in range(31, 41))  # held-out images: drawn as without it
