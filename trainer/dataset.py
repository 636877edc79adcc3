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

The export also serves LLaMA-Factory as is: the same file carries its ShareGPT preference layout in
three more columns (`conversations`: the prompt turns with an ``<image>`` placeholder per image;
`chosen_message` / `rejected_message`: one assistant turn each, as objects), and `export_parquet`
writes the `dataset_info.json` entry (``formatting: sharegpt``, ``ranking: true``, the column and
role-tag mapping) beside it, so ``dataset_dir`` = the export's folder and ``dataset`` = its stem
work without editing anything. Those names are none of the keys TRL reads (`prompt`, `chosen`,
`rejected`, `messages`, ...), so TRL ignores them; LLaMA-Factory's `images` is TRL's `images`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from services.common.images import DEFAULT_LIMITS, ImageLimits, box_to_pixels, decode_image, read_image_bytes
from services.core.formats import strip_media_placeholders
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
    """One TRL row for one pair.

    Media placeholders are dropped from the answers: one written by a garbage-producing policy would
    count as an image in TRL's processor call and fail the round, and with it every later one, since
    the offsets of a failed round never advance (serving strips them too, older pairs may have them).
    """
    return {
        "pair_id": pair.pair_id,
        "prompt": [_turn("user", pair.prompt, with_image=True)],
        "chosen": [_turn("assistant", strip_media_placeholders(pair.chosen.text))],
        "rejected": [_turn("assistant", strip_media_placeholders(pair.rejected.text))],
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


#: LLaMA-Factory's image placeholder in message text (one per entry of `images`).
LLAMA_FACTORY_IMAGE = "<image>"
_SHAREGPT_MESSAGE = {"role": Value("string"), "content": Value("string")}
LLAMA_FACTORY_FEATURES = Features(
    {
        **FEATURES,
        "conversations": List(_SHAREGPT_MESSAGE),
        "chosen_message": _SHAREGPT_MESSAGE,
        "rejected_message": _SHAREGPT_MESSAGE,
    }
)


def sharegpt_message(turn: dict[str, Any]) -> dict[str, str]:
    """A TRL turn (content blocks) as a ShareGPT message: text, images as placeholders, in order."""
    parts = [LLAMA_FACTORY_IMAGE if block["type"] == "image" else block["text"] for block in turn["content"]]
    return {"role": turn["role"], "content": "".join(parts)}


def with_llama_factory_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The LLaMA-Factory columns of one TRL row (a single-turn chosen/rejected each)."""
    (chosen,), (rejected,) = row["chosen"], row["rejected"]
    return {
        "conversations": [sharegpt_message(turn) for turn in row["prompt"]],
        "chosen_message": sharegpt_message(chosen),
        "rejected_message": sharegpt_message(rejected),
    }


def llama_factory_entry(parquet_name: str) -> dict[str, Any]:
    """The `dataset_info.json` entry that makes LLaMA-Factory read an export as a preference dataset."""
    return {
        "file_name": parquet_name,
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {
            "messages": "conversations",
            "chosen": "chosen_message",
            "rejected": "rejected_message",
            "images": "images",
        },
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    }


def export_parquet(dataset: Dataset, path: Path) -> Path:
    """Write `dataset` as one Parquet file that TRL and LLaMA-Factory read as is, and register it (under
    its file stem) in the `dataset_info.json` beside it, keeping the entries already there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exported = dataset.map(with_llama_factory_columns, features=LLAMA_FACTORY_FEATURES)
    exported.to_parquet(str(path))
    info_path = path.parent / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info[path.stem] = llama_factory_entry(path.name)
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def load_parquet(path: Path) -> Dataset:
    """A Parquet export loaded back the way any TRL user would."""
    from datasets import load_dataset

    loaded: Dataset = load_dataset("parquet", data_files=str(path), split="train")
    return loaded
