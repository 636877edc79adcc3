"""`spr-bootstrap`: build the world, train the policy on it (SFT from scratch), cache both.

    spr-bootstrap                      # the default recipe; prints the policy folder
    spr-bootstrap --steps 20 --images 60 --eval 200
    spr-bootstrap --grounder --clip    # also the scorers' world models (OWLv2 grounder, CLIP)

The result lives in `<root>/<recipe name>-<fingerprint>/` (`world/`, `policy/`, `spr-bootstrap.json`),
root being `--cache`, else `$SPR_BOOTSTRAP_CACHE`, else `~/.cache/spr/bootstrap`. The fingerprint covers
the recipe (model sizes, SFT settings, world seed and size, steps), this package's source and the library
versions, so a hit is only ever the same training. Training is seeded; on one machine with the same thread
count it repeats bit for bit. It is built in a hidden sibling folder and renamed into place once the
manifest is written, so a crash never leaves a folder that looks finished.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from services.bootstrap.clip import ClipRecipe, train_clip
from services.bootstrap.data import Example, describe_examples, rec_examples
from services.bootstrap.grounder import GrounderRecipe, train_grounder
from services.bootstrap.recipe import PolicyRecipe, build_model, build_processor, parameter_count
from services.bootstrap.train import Encoded, TrainLog, encode, train
from services.bootstrap.vision_pretrain import Scene, pretrain_vision_tower, scenes_of
from services.core.boxes import AnnotatedBox, Box
from services.core.formats import CoordinateFormat
from services.evaluation.datasets import RecSample, read_spr_rec
from services.world.build import SPLITS, WorldFiles, build_world
from services.world.scenes import SceneConfig, object_phrase

MANIFEST = "spr-bootstrap.json"
ENV_CACHE = "SPR_BOOTSTRAP_CACHE"
_LIBRARIES = ("torch", "transformers", "tokenizers", "pillow", "numpy")
FORMAT = CoordinateFormat.BRACKET_999  # LLaVA / Ferret boxes


@dataclass(frozen=True)
class Bootstrapped:
    folder: Path
    policy: Path
    world: Path
    rec_test: Path
    from_cache: bool
    seconds: float
    manifest: dict[str, Any]


def cache_root(out: str | Path | None = None) -> Path:
    if out is not None:
        return Path(out).expanduser()
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spr" / "bootstrap"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _sources_digest() -> str:
    """Every source file the trainings depend on, and the library versions."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parents[1]
    sources = sorted((here / "bootstrap").glob("*.py")) + sorted((here / "world").glob("*.py"))
    sources += [here / "evaluation" / "prompts.py", here / "modelzoo" / "tokenizer.py"]
    sources += [here / "modelzoo" / "recipes.py", here / "scorers" / "preprocess.py"]
    for source in sources:
        digest.update(source.read_bytes())
    for library in _LIBRARIES:
        digest.update(f"{library}={_version(library)}".encode())
    return digest.hexdigest()


def fingerprint(recipe: PolicyRecipe) -> str:
    """The recipe, every source file this training depends on, and the library versions."""
    return recipe.fingerprint(_sources_digest())


def folder_for(recipe: PolicyRecipe, root: str | Path | None = None) -> Path:
    return cache_root(root) / f"{recipe.name}-{fingerprint(recipe)}"


def is_complete(folder: Path) -> bool:
    """True when the manifest exists and every file it lists has its recorded size."""
    try:
        files: dict[str, int] = json.loads((folder / MANIFEST).read_text())["files"]
        return bool(files) and all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _result(folder: Path, from_cache: bool, seconds: float) -> Bootstrapped:
    manifest = json.loads((folder / MANIFEST).read_text())
    return Bootstrapped(
        folder,
        folder / "policy",
        folder / "world",
        folder / "world" / "rec_test.json",
        from_cache,
        seconds,
        manifest,
    )


def bootstrap(
    recipe: PolicyRecipe,
    root: str | Path | None = None,
    *,
    force: bool = False,
    say: Callable[[str], None] = lambda _: None,
    device: str = "cpu",
) -> Bootstrapped:
    """The cached bootstrap of `recipe`, training it first unless a complete one exists."""
    target = folder_for(recipe, root)
    from_cache, seconds = cached_build(target, lambda out: _build(recipe, out, say, device), force)
    return _result(target, from_cache, seconds)


def bootstrap_clip(
    recipe: ClipRecipe,
    world: WorldFiles,
    root: str | Path | None = None,
    *,
    force: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> tuple[Path, bool, dict[str, Any]]:
    """The semantic scorer's CLIP-architecture model trained on `world` (cached): folder, hit, manifest."""
    return _bootstrap_scorer_model(recipe, world, train_clip, root, force, say)


def bootstrap_grounder(
    recipe: GrounderRecipe,
    world: WorldFiles,
    root: str | Path | None = None,
    *,
    force: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> tuple[Path, bool, dict[str, Any]]:
    """The localization scorer's OWLv2-architecture grounder trained on `world` (cached): folder, hit,
    manifest."""
    return _bootstrap_scorer_model(recipe, world, train_grounder, root, force, say)


def _bootstrap_scorer_model(
    recipe: Any,
    world: WorldFiles,
    train_model: Callable[[Any, WorldFiles, Path, Callable[[str], None]], dict[str, Any]],
    root: str | Path | None,
    force: bool,
    say: Callable[[str], None],
) -> tuple[Path, bool, dict[str, Any]]:
    target = cache_root(root) / f"{recipe.name}-{recipe.fingerprint(world, _sources_digest())}"
    from_cache, _ = cached_build(target, lambda out: train_model(recipe, world, out, say), force)
    return target, from_cache, json.loads((target / MANIFEST).read_text())


def world_files(result: Bootstrapped) -> WorldFiles:
    """The world a bootstrap was trained on, as the scorer-model trainings read it."""
    return WorldFiles(result.world / "annotations.json", {s: result.world / f"rec_{s}.json" for s in SPLITS})


def cached_build(target: Path, build: Callable[[Path], dict[str, Any]], force: bool) -> tuple[bool, float]:
    """Run `build` into a hidden staging folder, write the manifest (its metrics and every file's size)
    last and rename the folder into place; skipped when `target` is complete. Returns (hit, seconds)."""
    start = time.perf_counter()
    if is_complete(target) and not force:
        return True, time.perf_counter() - start
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        metrics = build(staging)
        files = {
            p.relative_to(staging).as_posix(): p.stat().st_size
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        manifest = {**metrics, "libraries": {lib: _version(lib) for lib in _LIBRARIES}, "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _install(staging, target, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return False, time.perf_counter() - start


def _install(staging: Path, target: Path, force: bool) -> None:
    """Move a finished build into place; keep a complete one that a concurrent builder installed first."""
    if target.exists() and (force or not is_complete(target)):
        shutil.rmtree(target)  # replaced on request, or a leftover of a build that died mid-way
    try:
        staging.rename(target)
    except OSError:
        if not is_complete(target):
            raise


def _build(recipe: PolicyRecipe, out: Path, say: Callable[[str], None], device: str) -> dict[str, Any]:
    cfg = SceneConfig(
        max_objects=recipe.world_max_objects, single_object_share=recipe.world_single_object_share
    )
    world = build_world(out / "world", recipe.world_images, recipe.world_seed, cfg, recipe.test_fraction)
    say(f"world: {recipe.world_images} images in {out / 'world'}")
    with torch.random.fork_rng(devices=[]):
        model, processor, log = train_policy(recipe, world, say, device)
    say(f"trained in {log.seconds:.0f}s")
    model.save_pretrained(out / "policy")
    processor.save_pretrained(out / "policy")
    return {
        "recipe": asdict(recipe),
        "fingerprint": fingerprint(recipe),
        "train_seconds": round(log.seconds, 1),
        "device": device,  # not in the fingerprint: any device's training of the recipe is a valid entry
        "losses": log.losses,
        "vision_pretrain_seconds": round(log.vision_seconds, 1),
        "vision_pretrain_losses": log.vision_losses,
        "parameters": parameter_count(model),
    }


def train_policy(
    recipe: PolicyRecipe, world: WorldFiles, say: Callable[[str], None], device: str, log_every: int = 50
) -> tuple[Any, Any, TrainLog]:
    """A fresh policy of the recipe (seeded), trained by SFT on the world's training split."""
    torch.manual_seed(recipe.seed)
    processor = build_processor(recipe)
    model = build_model(recipe, processor)
    split = training_split(world)
    vision_log, vision_seconds = pretrain_vision(model, processor, split, recipe, say, log_every)
    rec, describe = training_data(split, processor, recipe)
    say(
        f"policy: {type(model).__name__}, {parameter_count(model) / 1e6:.2f}M parameters; "
        f"{len(rec)} REC and {len(describe)} description examples; {recipe.steps} steps"
    )
    on_log = lambda s, v: say(f"step {s}: loss {v:.3f}")  # noqa: E731
    log = train(model, processor, rec, describe, recipe, on_log=on_log, log_every=log_every, device=device)
    log.vision_losses, log.vision_seconds = vision_log, vision_seconds
    return model, processor, log


def pretrain_vision(
    model: Any,
    processor: Any,
    split: TrainingSplit,
    recipe: PolicyRecipe,
    say: Callable[[str], None],
    log_every: int,
) -> tuple[list[tuple[int, float]], float]:
    """The vision tower's dense grounding pretraining on the training scenes, then its freezing for SFT
    when the recipe says so. Returns the pretraining's (step, loss) log and its seconds."""
    log: list[tuple[int, float]] = []
    start = time.perf_counter()
    if recipe.vision_pretrain_steps > 0:
        scenes = training_scenes(split)
        steps = recipe.vision_pretrain_steps
        say(f"vision tower: dense grounding pretraining on {len(scenes)} scenes, {steps} steps")
        log = pretrain_vision_tower(
            model.model.vision_tower,
            processor.image_processor,
            scenes,
            recipe.image_size // recipe.patch_size,
            steps=steps,
            batch_size=recipe.vision_pretrain_batch_size,
            learning_rate=recipe.vision_pretrain_learning_rate,
            seed=recipe.seed,
            on_log=lambda s, v: say(f"vision step {s}: loss {v:.3f}"),
            log_every=log_every,
        )
    if recipe.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    return log, time.perf_counter() - start


@dataclass(frozen=True)
class TrainingSplit:
    """The world's training split, read and decoded once for every stage that trains on it."""

    samples: list[RecSample]
    coco: dict[str, Any]
    folder: Path
    images: dict[str, Image.Image]  # path -> RGB image


def training_split(world: WorldFiles) -> TrainingSplit:
    samples = read_spr_rec(world.rec["train"])
    coco = json.loads(world.annotations.read_text())
    images = {path: _load(path) for path in sorted({s.image_path for s in samples})}
    return TrainingSplit(samples, coco, world.annotations.parent, images)


def training_scenes(split: TrainingSplit) -> list[Scene]:
    """Every training image with its annotated objects in drawing order (held-out images excluded)."""
    return scenes_of(split.coco, split.folder, split.images)


def training_data(
    split: TrainingSplit, processor: Any, recipe: PolicyRecipe
) -> tuple[list[Encoded], list[Encoded]]:
    """Encoded REC and region-description examples of the world's training images."""
    objects, phrases = _objects(split.coco, split.folder, set(split.images))
    slack = recipe.box_label_slack
    named = phrases if recipe.rec_answer_names_object else None
    rec = rec_examples(split.samples, FORMAT, split.images, slack, named)
    describe = describe_examples(objects, split.images, phrases, per_image=2, seed=recipe.seed, slack=slack)
    return _encode_all(processor, recipe, rec), _encode_all(processor, recipe, describe)


def _encode_all(processor: Any, recipe: PolicyRecipe, examples: list[Example]) -> list[Encoded]:
    return [encode(processor, recipe.image_tokens, e) for e in examples]


def _load(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _objects(
    coco: dict[str, Any], folder: Path, paths: set[str]
) -> tuple[dict[str, list[AnnotatedBox]], dict[int, str]]:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    path_of = {image["id"]: str(folder / image["file_name"]) for image in coco["images"]}
    objects: dict[str, list[AnnotatedBox]] = {path: [] for path in paths}
    phrases = {}
    for ann in coco["annotations"]:
        path = path_of[ann["image_id"]]
        if path in objects:
            box = Box.from_xywh(*(float(v) for v in ann["bbox"]))
            objects[path].append(AnnotatedBox(ann["id"], names[ann["category_id"]], box))
            attributes = ann["attributes"]
            phrases[ann["id"]] = object_phrase(
                attributes["color"], attributes["shape"], attributes["texture"]
            )
    return objects, phrases


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = PolicyRecipe()
    parser = argparse.ArgumentParser(prog="spr-bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help=f"cache root (default: ${ENV_CACHE}, else ~/.cache/spr/bootstrap)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--images", type=int, default=defaults.world_images, help="world size")
    parser.add_argument("--world-seed", type=int, default=defaults.world_seed)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="training seed")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--vision-steps",
        type=int,
        default=defaults.vision_pretrain_steps,
        help="the vision tower's dense grounding pretraining steps before SFT (0: none)",
    )
    parser.add_argument(
        "--box-slack",
        type=float,
        default=defaults.box_label_slack,
        help="SFT answers' boxes drawn this share of their size loose on every side (0: exact boxes)",
    )
    parser.add_argument(
        "--rec-answer-names-object",
        action=argparse.BooleanOptionalAction,
        default=defaults.rec_answer_names_object,
        help="REC answers name the target object before its box, as a description mention does",
    )
    parser.add_argument("--force", action="store_true", help="train again even when cached")
    parser.add_argument(
        "--device", default="cpu", help="where to train (cpu, cuda); the result is saved for CPU"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clip", action="store_true", help="also train the semantic scorer's CLIP model")
    parser.add_argument("--clip-steps", type=int, default=ClipRecipe().steps)
    parser.add_argument(
        "--grounder", action="store_true", help="also train the localization scorer's OWLv2 grounder"
    )
    parser.add_argument("--grounder-steps", type=int, default=GrounderRecipe().steps)
    parser.add_argument(
        "--eval", type=int, default=0, metavar="N", help="then score REC on N held-out expressions"
    )
    return parser.parse_args(argv)


def recipe_from_args(args: argparse.Namespace) -> PolicyRecipe:
    """The policy recipe of `spr-bootstrap`'s arguments; with none given, exactly the default recipe,
    so that warming the cache with `spr-bootstrap` fills the very entry `spr-main` looks up."""
    defaults = PolicyRecipe()
    warmup = defaults.warmup_steps
    if args.steps != defaults.steps:  # a shorter run warms up for at most a tenth of it
        warmup = min(warmup, max(args.steps // 10, 1))
    return replace(
        defaults,
        steps=args.steps,
        world_images=args.images,
        world_seed=args.world_seed,
        seed=args.seed,
        batch_size=args.batch_size,
        vision_pretrain_steps=args.vision_steps,
        box_label_slack=args.box_slack,
        rec_answer_names_object=args.rec_answer_names_object,
        warmup_steps=warmup,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda m: print(f"[spr-bootstrap {time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    result = bootstrap(recipe, args.cache, force=args.force, say=say, device=args.device)
    state = "cached" if result.from_cache else "trained"
    print(f"policy\t{result.policy}\t{state} in {result.seconds:.1f}s")
    print(f"rec_test\t{result.rec_test}")
    if args.clip:
        clip_recipe = replace(ClipRecipe(), steps=args.clip_steps)
        folder, hit, manifest = bootstrap_clip(
            clip_recipe, world_files(result), args.cache, force=args.force, say=say
        )
        state = "cached" if hit else "trained"
        print(f"clip\t{folder}\t{state}; held-out top-1 retrieval {manifest['retrieval_top1']:.1%}")
    if args.grounder:
        grounder_recipe = replace(GrounderRecipe(), steps=args.grounder_steps)
        folder, hit, manifest = bootstrap_grounder(
            grounder_recipe, world_files(result), args.cache, force=args.force, say=say
        )
        state = "cached" if hit else "trained"
        print(f"grounder\t{folder}\t{state}; held-out grounding Acc@0.5 {manifest['grounding_acc50']:.1%}")
    if args.eval:
        from services.evaluation.cli import evaluate_paths

        evaluate_paths(result.policy, [result.rec_test], limit=args.eval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
