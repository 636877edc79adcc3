"""Referring expressions for the shapes world, RefCOCO style, each with exactly one answer.

An expression is structured (`Expression`) and rendered to text; `resolve` evaluates it against a
scene's objects, so "exactly one object answers it" is checked by the same code that defines what it
means, never assumed. Three kinds:

- attribute: the shortest attribute phrase that singles the object out ("the striped red circle");
- absolute: an extreme position within a group of look-alikes ("the red circle on the left",
  "the topmost blue square");
- relational: a relation to another, uniquely named object ("the red circle left of the blue square").

Spatial kinds are preferred, and most of them are needed: the scene holds several objects of the same
colour and shape (`SceneConfig.repeat_probability`), which only position tells apart. Spatial relations
need a clear margin (`MARGIN` pixels between centres); a borderline case makes the expression ambiguous,
so it is not used.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from services.world.scenes import XYXY

MARGIN = 4.0  # pixels between centres for "left of", "above", "leftmost" to count as clear
MIN_VISIBLE = 0.5  # objects hidden more than this are never the answer
Kind = Literal["attribute", "absolute", "relational"]
Direction = Literal["left", "right", "top", "bottom"]
DIRECTIONS: tuple[Direction, ...] = ("left", "right", "top", "bottom")
_RELATION_WORDS = {"left": "left of", "right": "right of", "top": "above", "bottom": "below"}
_EXTREME_WORDS = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}
_PAIR_WORDS = {"left": "on the left", "right": "on the right", "top": "on top", "bottom": "at the bottom"}


@dataclass(frozen=True)
class WorldObject:
    """What an expression can talk about: attributes and the box (xyxy pixels)."""

    annotation_id: int
    box: XYXY
    color: str
    shape: str
    texture: str
    visible_fraction: float = 1.0

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0)


@dataclass(frozen=True)
class Descriptor:
    """`[texture] [colour] shape`; None attributes are not mentioned and match anything."""

    shape: str
    color: str | None = None
    texture: str | None = None

    def matches(self, obj: WorldObject) -> bool:
        return (
            obj.shape == self.shape
            and self.color in (None, obj.color)
            and self.texture in (None, obj.texture)
        )

    def words(self) -> str:
        return " ".join(w for w in (self.texture, self.color, self.shape) if w)


@dataclass(frozen=True)
class Expression:
    target: Descriptor
    direction: Direction | None = None  # absolute: the extreme one in this direction
    anchor: Descriptor | None = None  # relational: `direction` is the relation to this anchor

    @property
    def kind(self) -> Kind:
        if self.direction is None:
            return "attribute"
        return "absolute" if self.anchor is None else "relational"

    def text(self, group_size: int = 2) -> str:
        """The English expression; absolute ones say "on the left" for pairs, "leftmost" beyond."""
        if self.direction is None:
            return f"the {self.target.words()}"
        if self.anchor is not None:
            return f"the {self.target.words()} {_RELATION_WORDS[self.direction]} the {self.anchor.words()}"
        if group_size == 2:
            return f"the {self.target.words()} {_PAIR_WORDS[self.direction]}"
        return f"the {_EXTREME_WORDS[self.direction]} {self.target.words()}"


def _coordinate(obj: WorldObject, direction: Direction) -> float:
    """Position along `direction`, larger = further that way."""
    cx, cy = obj.center
    return {"left": -cx, "right": cx, "top": -cy, "bottom": cy}[direction]


def _relation(a: WorldObject, b: WorldObject, direction: Direction) -> bool | None:
    """Is `a` clearly `direction` of `b`? True, False, or None when too close to call."""
    gap = _coordinate(a, direction) - _coordinate(b, direction)
    if gap >= MARGIN:
        return True
    if gap <= 0:
        return False
    return None


def resolve(expression: Expression, objects: Sequence[WorldObject]) -> list[WorldObject] | None:
    """The objects the expression picks out, or None when it is ambiguous (a borderline position or
    an anchor that is not exactly one object)."""
    group = [o for o in objects if expression.target.matches(o)]
    if expression.direction is None:
        return group
    if expression.anchor is None:
        return _extreme(group, expression.direction)
    anchors = [o for o in objects if expression.anchor.matches(o)]
    if len(anchors) != 1:
        return None
    verdicts = [(o, _relation(o, anchors[0], expression.direction)) for o in group if o is not anchors[0]]
    if any(v is None for _, v in verdicts):
        return None
    return [o for o, v in verdicts if v]


def _extreme(group: list[WorldObject], direction: Direction) -> list[WorldObject] | None:
    if len(group) < 2:
        return None  # "the one on the left" of a single object is no disambiguation at all
    ranked = sorted(group, key=lambda o: _coordinate(o, direction), reverse=True)
    if _coordinate(ranked[0], direction) - _coordinate(ranked[1], direction) < 2 * MARGIN:
        return None
    return [ranked[0]]


def _descriptors(obj: WorldObject) -> list[Descriptor]:
    """Phrases for `obj`, shortest first."""
    return [
        Descriptor(obj.shape),
        Descriptor(obj.shape, obj.color),
        Descriptor(obj.shape, obj.color, obj.texture),
    ]


def _unique_descriptor(obj: WorldObject, objects: Sequence[WorldObject]) -> Descriptor | None:
    for descriptor in _descriptors(obj):
        if [o for o in objects if descriptor.matches(o)] == [obj]:
            return descriptor
    return None


def candidate_expressions(target: WorldObject, objects: Sequence[WorldObject]) -> list[Expression]:
    """Every expression of the three kinds whose only answer is `target`."""
    found: list[Expression] = []
    attribute = _unique_descriptor(target, objects)
    if attribute is not None:
        found.append(Expression(attribute))
    category = Descriptor(target.shape, target.color)
    for direction in DIRECTIONS:
        found.append(Expression(category, direction))
        for anchor in objects:
            anchor_words = _unique_descriptor(anchor, objects) if anchor is not target else None
            if anchor_words is not None:
                found.append(Expression(category, direction, anchor_words))
    return [e for e in found if resolve(e, objects) == [target]]


@dataclass(frozen=True)
class Referral:
    """One chosen expression for one object."""

    target: WorldObject
    expression: Expression
    text: str
    category_ambiguous: bool  # another object has the same colour and shape


def refer(objects: Sequence[WorldObject], rng: random.Random, attribute_share: float = 0.2) -> list[Referral]:
    """One unique-answer expression per referable object of a scene, spatial ones preferred.

    With probability `attribute_share` an object that can be named by its attributes alone gets that
    expression instead (RefCOCO holds both); an object with no unique expression is skipped.
    """
    referrals = []
    for target in objects:
        if target.visible_fraction < MIN_VISIBLE:
            continue
        candidates = candidate_expressions(target, objects)
        spatial = [e for e in candidates if e.kind != "attribute"]
        attribute = [e for e in candidates if e.kind == "attribute"]
        pool = attribute if attribute and (not spatial or rng.random() < attribute_share) else spatial
        if not pool:
            continue
        expression = rng.choice(pool)
        group = [o for o in objects if expression.target.matches(o)]
        same_category = sum(o.color == target.color and o.shape == target.shape for o in objects)
        referrals.append(Referral(target, expression, expression.text(len(group)), same_category > 1))
    return referrals
