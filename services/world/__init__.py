"""The demo world: procedurally generated grounded images in COCO format, with referring expressions."""

from services.world.scenes import SceneConfig, generate_world

__all__ = ["SceneConfig", "generate_world"]
