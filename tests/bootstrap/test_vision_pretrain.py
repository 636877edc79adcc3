"""The vision tower's dense grounding pretraining: its per-patch targets, that it teaches the tower (and
only the tower) where objects are, and that the tower is frozen for SFT when the recipe says so."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from services.bootstrap.pipeline import pretrain_vision, training_scenes, training_split
from services.bootstrap.recipe import PolicyRecipe, build_model, build_processor
from services.bootstrap.vision_pretrain import IGNORE, Scene, SceneObject, patch_targets
from services.world.build import build_world
from services.world.scenes import SceneConfig

ATTRS = {"color": "red", "shape": "circle", "texture": "plain"}


def test_each_patch_targets_the_frontmost_object_under_its_centre() -> None:
    back = SceneObject((0.0, 0.0, 48.0, 48.0), ATTRS)
    front = SceneObject((30.0, 30.0, 60.0, 60.0), {"color": "blue", "shape": "square", "texture": "dotted"})
    targets = patch_targets(Scene(Image.new("RGB", (96, 96)), (back, front)), grid=6)  # 16 px patches
    # patch (row 0, col 0): centre (8, 8) -> back; (row 2, col 2): centre (40, 40) -> both, front wins
    assert targets.covered[0] == 1 and targets.covered[2 * 6 + 2] == 1
    assert torch.allclose(targets.boxes[0], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert torch.allclose(targets.boxes[2 * 6 + 2], torch.tensor([30 / 96, 30 / 96, 60 / 96, 60 / 96]))
    assert targets.attributes["color"][0] == 0 and targets.attributes["color"][2 * 6 + 2] == 2  # red, blue
    # patch (row 5, col 5): centre (88, 88) -> nothing: no box or attribute loss there
    assert targets.covered[35] == 0 and targets.attributes["shape"][35] == IGNORE
    # back covers the centres 8, 24, 40 on both axes (3 x 3 patches), front 40 and 56 (2 x 2), one shared
    assert int(targets.covered.sum()) == 9 + 4 - 1


def test_pretraining_teaches_the_tower_alone_then_freezes_it(tmp_path: Path) -> None:
    world = build_world(tmp_path / "world", 48, seed=3, cfg=SceneConfig(max_objects=3), test_fraction=0.25)
    split = training_split(world)
    scenes = training_scenes(split)
    assert len(scenes) == 36 and all(s.objects for s in scenes)
    recipe = replace(PolicyRecipe(), vision_pretrain_steps=60, vision_pretrain_batch_size=8)
    torch.manual_seed(0)
    processor = build_processor(recipe)
    model = build_model(recipe, processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log, seconds = pretrain_vision(model, processor, split, recipe, lambda _: None, log_every=10)
    assert seconds > 0 and len(log) == 6
    assert log[-1][1] < 0.7 * log[0][1], log  # the dense loss falls clearly
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.vision_tower.") for n in changed)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
