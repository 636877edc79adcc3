"""Preference pairs -> a TRL DPO dataset, its Parquet export and its sha256.

One row per `spr.v1.PreferencePair`, in TRL's conversational vision format:

* ``prompt``: one user turn ``[image, instruction]`` — exactly the turn `services.policy.runner.chat_prompt`
  renders for serving, so training and serving see the same prompt;
* ``chosen`` / ``rejected``: one assistant turn each;
* ``images``: the one frame the policy saw, rebuilt from the pair the way the describer built it
  (region crop or full image, resized to the family's frame);
* ``pair_id``: for tracing a row back to its pair (TRL ignores extra columns).

`datasets.Dataset.to_parquet` writes it as a plain Hugging Face dataset (images as PNG bytes), which
`DPOTrainer` loads back as is (`datasets.load_dataset("parquet", ...)`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from services.common.images import DEFAULT_LIMITS, ImageLimits, box_to_pixels, decode_image, read_image_bytes
from services.describer.families import ModelFamily, PromptKind
from services.describer.logic import Describer
from spr.v1 import pairs_pb2

_TEXT_BLOCK = {"type": Value("string"), "text": Value("string")}
_TURNS = List({"role": Value("string"), "content": List(_TEXT_BLOCK)})
#: Fixed features: an empty dataset and a full one have the same schema, so Parquet files concatenate.
FEATURES = Features(
    {
        "pair_id": Value("string"),
        "prompt": _TURNS,
        "chosen": _TURNS,
        "rejected": _TURNS,
        "images": List(Image()),
    }
)


def policy_frame(
    pair: pairs_pb2.PreferencePair, family: ModelFamily, limits: ImageLimits = DEFAULT_LIMITS
) -> PILImage.Image:
    """The image the policy was shown for this pair, rebuilt with the describer's own functions."""
    image = decode_image(read_image_bytes(pair.region.image.uri, limits), limits)
    bounds = box_to_pixels(pair.region.box, image.width, image.height)
    # An unspecified mode is the describer's default, a crop mode in every family.
    kind = PromptKind.from_proto(pair.prompt_mode) or PromptKind.CROP
    _, source = Describer._source(kind, image, bounds)
    size = family.frame_size(source.width, source.height)
    # Same resampling as Describer._encode, so the pixels match what serving received.
    return source if source.size == size else source.resize(size, PILImage.Resampling.BICUBIC)


def _turn(role: str, text: str, with_image: bool = False) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [{"type": "image", "text": None}] if with_image else []
    blocks.append({"type": "text", "text": text})
    return {"role": role, "content": blocks}


def to_example(pair: pairs_pb2.PreferencePair, frame: PILImage.Image) -> dict[str, Any]:
    """One TRL row for one pair."""
    return {
        "pair_id": pair.pair_id,
        "prompt": [_turn("user", pair.prompt, with_image=True)],
        "chosen": [_turn("assistant", pair.chosen.text)],
        "rejected": [_turn("assistant", pair.rejected.text)],
        "images": [frame],
    }


def build_dataset(
    pairs: Iterable[pairs_pb2.PreferencePair], family: ModelFamily, limits: ImageLimits = DEFAULT_LIMITS
) -> Dataset:
    """The DPO dataset of `pairs`, in their order."""
    rows = [to_example(pair, policy_frame(pair, family, limits)) for pair in pairs]
    return Dataset.from_list(rows, features=FEATURES)


def dataset_sha256(dataset: Dataset) -> str:
    """sha256 over exactly what training reads: texts and image pixels, row by row, in order."""
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(repr((row["pair_id"], row["prompt"], row["chosen"], row["rejected"])).encode())
        for image in row["images"]:
            digest.update(f"{image.mode}{image.size}".encode())
            digest.update(image.tobytes())
    return digest.hexdigest()


def is_heldout(pair_id: str, fraction: float) -> bool:
    """Stable split by pair id: a pair stays on its side in every round and every rerun."""
    bucket = int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "big") / 2**64
    return bucket < fraction


def split_heldout(dataset: Dataset, fraction: float) -> tuple[Dataset, Dataset]:
    """(train, held-out). With a positive fraction both sides get at least one row when there are two."""
    ids: Sequence[str] = dataset["pair_id"]
    held = [i for i, pid in enumerate(ids) if is_heldout(pid, fraction)]
    if fraction > 0 and len(ids) >= 2:
        if not held:
            held = [len(ids) - 1]
        if len(held) == len(ids):
            held = held[1:]
    held_set = set(held)
    train = [i for i in range(len(ids)) if i not in held_set]
    return dataset.select(train), dataset.select(held)


def export_parquet(dataset: Dataset, path: Path) -> Path:
    """Write `dataset` as one Parquet file (readable by `datasets.load_dataset("parquet")`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path))
    return path


def load_parquet(path: Path) -> Dataset:
    """A Parquet export loaded back the way any TRL user would."""
    from datasets import load_dataset

    loaded: Dataset = load_dataset("parquet", data_files=str(path), split="train")
    return loaded
