"""`spr-tiny-models`: build tiny random-weight models of the real architectures SPR runs, and cache them.

No model hub is reachable here, so tests (and anyone trying the stack) use these instead of released
checkpoints. Each one is the real transformers class (Qwen2.5-VL, Qwen2-VL, LLaVA, Grounding DINO, OWLv2,
CLIP, SigLIP) with a tiny config and a locally built tokenizer, saved with `save_pretrained` and loaded back
through `services.modelzoo.loading`, the code production uses (recipes: `services.modelzoo.recipes`).

    spr-tiny-models                      # build all of them (or reuse the cache), print name and folder
    spr-tiny-models tiny-qwen2.5-vl      # only some
    spr-tiny-models --out DIR --seed 1   # another cache root / other random weights
    spr-tiny-models --list

Models live in `<root>/<name>-<fingerprint>`, root being `--out`, else `$SPR_MODEL_CACHE`, else
`~/.cache/spr/tiny-models`. The fingerprint covers the seed, the factory's source and the library
versions, so a change to any of them builds afresh instead of reusing stale files. A folder is complete
once its manifest is written; folders are built aside and renamed into place, so concurrent builders
never see half a model. Builds are deterministic: the same seed gives byte-identical files.

This module imports no model code, so that a cache hit costs milliseconds, not seconds of imports.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Bump on any change that must invalidate caches beyond what the source fingerprint catches.
FACTORY_VERSION = 1
DEFAULT_SEED = 0
MANIFEST = "spr-tiny-model.json"
ENV_CACHE = "SPR_MODEL_CACHE"

# name -> what it is; `services.modelzoo.recipes.RECIPES` holds how to build each one.
MODELS: dict[str, str] = {
    "tiny-qwen2.5-vl": "Qwen2.5-VL policy (Qwen2_5_VLForConditionalGeneration)",
    "tiny-qwen2-vl": "Qwen2-VL policy (Qwen2VLForConditionalGeneration)",
    "tiny-llava": "LLaVA-1.5-style policy, [x1, y1, x2, y2] boxes (LlavaForConditionalGeneration)",
    "tiny-grounding-dino": "Grounding DINO detector (GroundingDinoForObjectDetection)",
    "tiny-owlv2": "OWLv2 detector (Owlv2ForObjectDetection)",
    "tiny-clip": "CLIP dual encoder (CLIPModel)",
    "tiny-siglip": "SigLIP dual encoder (SiglipModel)",
}

# Everything that decides the bytes of a build, besides the seed.
_SOURCES = ("tiny.py", "recipes.py", "tokenizer.py", "loading.py")
_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "sentencepiece", "pillow")


def cache_root(out: str | Path | None = None) -> Path:
    """Where tiny models are cached: `out`, else `$SPR_MODEL_CACHE`, else `~/.cache/spr/tiny-models`."""
    if out is not None:
        return Path(out).expanduser()
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spr" / "tiny-models"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def fingerprint(seed: int = DEFAULT_SEED) -> str:
    """12 hex digits over the seed, the factory's source files and the versions of the libraries used."""
    digest = hashlib.sha256(f"{FACTORY_VERSION}|{seed}".encode())
    for library in _LIBRARIES:
        digest.update(f"|{library}={_version(library)}".encode())
    here = Path(__file__).parent
    for source in _SOURCES:
        digest.update((here / source).read_bytes())
    return digest.hexdigest()[:12]


def model_dir(name: str, *, out: str | Path | None = None, seed: int = DEFAULT_SEED) -> Path:
    """The cache folder of tiny model `name` (built or not)."""
    if name not in MODELS:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(MODELS)}")
    return cache_root(out) / f"{name}-{fingerprint(seed)}"


def is_complete(path: Path) -> bool:
    """True when `path` holds a finished build: its manifest lists files that all exist with their sizes."""
    try:
        files: dict[str, dict[str, Any]] = json.loads((path / MANIFEST).read_text())["files"]
        return bool(files) and all((path / f).stat().st_size == meta["size"] for f, meta in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _finish(path: Path, name: str, seed: int) -> None:
    """Make the staged build readable like any cache entry (not 0700/0600) and write its manifest last."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        file.chmod(0o666 & ~umask)
        data = file.read_bytes()
        files[file.relative_to(path).as_posix()] = {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    manifest = {
        "name": name,
        "seed": seed,
        "fingerprint": fingerprint(seed),
        "factory_version": FACTORY_VERSION,
        "libraries": {library: _version(library) for library in _LIBRARIES},
        "files": files,
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _install(staging: Path, target: Path, force: bool) -> None:
    """Move a finished build into place; keep a complete one a concurrent builder installed first."""
    if target.exists() and (force or not is_complete(target)):
        shutil.rmtree(target)  # replaced on request, or a leftover of a build that died mid-way
    try:
        staging.rename(target)
    except OSError:
        if not is_complete(target):
            raise


def ensure_model(
    name: str,
    *,
    out: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    force: bool = False,
    check: bool = True,
) -> Path:
    """Return the folder of tiny model `name`, building it first unless a complete build is cached.

    The build happens in a hidden sibling folder renamed into place when done. `check` loads the new
    build through `services.modelzoo.loading` and runs it once before it is kept.
    """
    target = model_dir(name, out=out, seed=seed)
    if is_complete(target) and not force:
        return target
    from services.modelzoo import recipes  # imports the model classes: only when building

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        recipes.build(name, staging, seed=seed, check=check)
        _finish(staging, name, seed)
        _install(staging, target, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_models(
    names: Sequence[str] | None = None,
    *,
    out: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    force: bool = False,
    check: bool = True,
) -> dict[str, Path]:
    """`ensure_model` for each of `names` (default: all), in order; returns name -> folder."""
    return {n: ensure_model(n, out=out, seed=seed, force=force, check=check) for n in names or MODELS}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="spr-tiny-models", description="Build (or reuse) tiny random-weight models for tests and demos."
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(MODELS)}")
    parser.add_argument("--out", help=f"cache root (default: ${ENV_CACHE}, else ~/.cache/spr/tiny-models)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the random weights")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is complete")
    parser.add_argument("--no-check", action="store_true", help="do not load and run each new build")
    parser.add_argument("--list", action="store_true", help="only list the models, their folders and state")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `spr-tiny-models`: prints `name<TAB>folder<TAB>state` for each model."""
    args = _parse_args(argv)
    for name in args.names or MODELS:
        folder = model_dir(name, out=args.out, seed=args.seed)
        cached = is_complete(folder)
        if args.list:
            print(f"{name}\t{folder}\t{'cached' if cached else 'missing'}\t{MODELS[name]}")
            continue
        start = time.perf_counter()
        ensure_model(name, out=args.out, seed=args.seed, force=args.force, check=not args.no_check)
        state = "cached" if cached and not args.force else f"built in {time.perf_counter() - start:.1f}s"
        print(f"{name}\t{folder}\t{state}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
