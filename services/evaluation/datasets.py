"""Referring-expression datasets: one readable format (`spr-rec/v1`) and readers for the real ones.

Every reader returns `RecSample`s: an image, one expression and its ground-truth box(es) in absolute
pixels (xyxy). A sample with several boxes (a Flickr30k entity drawn as several boxes) counts as right
when the prediction matches any of them (the "ANY-box" protocol).

- `spr-rec/v1` (what the shapes world writes)::

      {"format": "spr-rec/v1", "name": "...",
       "images": [{"id": 1, "file_name": "images/a.png", "width": 96, "height": 96}],
       "expressions": [{"id": "1-3", "image_id": 1, "text": "the red circle left of the blue square",
                        "boxes": [[x1, y1, x2, y2]], "kind": "relational", "category_ambiguous": true}]}

  `file_name` is relative to the JSON's folder (or absolute); `kind` and `category_ambiguous` are
  optional tags reported per group.
- RefCOCO / RefCOCO+ / RefCOCOg (the `refer` toolkit layout): `refs(<split_by>).p` (a pickle, as
  released; or the same list as JSON) plus `instances.json` (COCO, boxes xywh); one sample per sentence.
- Flickr30k Entities: `Sentences/<image>.txt` (`[/EN#18/people A man] in ...`) and
  `Annotations/<image>.xml` (Pascal VOC boxes named by entity id); one sample per boxed phrase.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.boxes import Box

SPR_REC_FORMAT = "spr-rec/v1"


class RecDataError(ValueError):
    """A dataset file cannot be read as the format it claims to be."""


@dataclass(frozen=True)
class RecSample:
    sample_id: str
    image_path: str
    expression: str
    boxes: tuple[Box, ...]
    width: int = 0
    height: int = 0
    tags: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


# --- spr-rec/v1 -------------------------------------------------------------------------------------


def write_spr_rec(
    path: Path, name: str, images: Sequence[dict[str, Any]], expressions: Sequence[dict[str, Any]]
) -> Path:
    """Write an `spr-rec/v1` file (images as in COCO; expressions as in the module doc)."""
    document = {
        "format": SPR_REC_FORMAT,
        "name": name,
        "images": list(images),
        "expressions": list(expressions),
    }
    path.write_text(json.dumps(document, indent=1))
    return path


def read_spr_rec(path: str | os.PathLike[str]) -> list[RecSample]:
    path = Path(path)
    data = _json(path)
    if not isinstance(data, dict) or data.get("format") != SPR_REC_FORMAT:
        raise RecDataError(f"{path}: not an {SPR_REC_FORMAT} file (its 'format' field says otherwise)")
    images = {image["id"]: image for image in data.get("images", [])}
    samples = []
    for i, item in enumerate(data.get("expressions", [])):
        image = images.get(item.get("image_id"))
        if image is None:
            raise RecDataError(f"{path}: expression #{i} names unknown image {item.get('image_id')!r}")
        boxes = tuple(_xyxy(b, f"{path}: expression #{i}") for b in item.get("boxes", []))
        if not boxes:
            raise RecDataError(f"{path}: expression #{i} has no box")
        tags = {k: item[k] for k in ("kind", "category_ambiguous", "annotation_id") if k in item}
        samples.append(
            RecSample(
                sample_id=str(item.get("id", i)),
                image_path=_resolve(path.parent, image["file_name"]),
                expression=str(item["text"]),
                boxes=boxes,
                width=int(image.get("width", 0)),
                height=int(image.get("height", 0)),
                tags=tags,
            )
        )
    return samples


# --- RefCOCO family ---------------------------------------------------------------------------------


def read_refcoco(
    refs_path: str | os.PathLike[str],
    instances_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    split: str | None = "test",
) -> list[RecSample]:
    """RefCOCO/RefCOCO+/RefCOCOg refs (pickle or JSON list) + COCO instances; `split` None = all.

    Only open pickles from a source you trust: unpickling runs code. The released refs files are pickles.
    """
    refs = _load_refs(Path(refs_path))
    instances = _json(Path(instances_path))
    images = {image["id"]: image for image in instances["images"]}
    boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
    samples: list[RecSample] = []
    for ref in refs:
        if split is not None and ref.get("split") != split:
            continue
        if ref["ann_id"] not in boxes or ref["image_id"] not in images:
            raise RecDataError(f"ref {ref.get('ref_id')}: annotation or image missing from {instances_path}")
        image = images[ref["image_id"]]
        box = Box.from_xywh(*(float(v) for v in boxes[ref["ann_id"]]))
        for sentence in ref["sentences"]:
            samples.append(
                RecSample(
                    sample_id=f"{ref['ref_id']}-{sentence.get('sent_id', len(samples))}",
                    image_path=_resolve(Path(image_root), image["file_name"]),
                    expression=str(sentence.get("sent") or sentence.get("raw", "")).strip(),
                    boxes=(box,),
                    width=int(image.get("width", 0)),
                    height=int(image.get("height", 0)),
                    tags={"split": ref.get("split"), "category_id": ref.get("category_id")},
                )
            )
    return samples


def _load_refs(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".json":
        refs = _json(path)
    else:
        try:
            with path.open("rb") as file:
                refs = pickle.load(file)  # the released format; see read_refcoco's warning
        except (OSError, pickle.UnpicklingError, EOFError) as error:
            raise RecDataError(f"{path}: cannot read refs: {error}") from error
    if not isinstance(refs, list):
        raise RecDataError(f"{path}: refs must be a list of ref records")
    return refs


# --- Flickr30k Entities -----------------------------------------------------------------------------

_PHRASE = re.compile(r"\[/EN#(?P<entity>\d+)/(?P<types>[^\s\]]+) (?P<text>[^\]]+)\]")


def read_flickr30k_entities(
    root: str | os.PathLike[str], image_root: str | os.PathLike[str], image_ids: Iterable[str] | None = None
) -> list[RecSample]:
    """Flickr30k Entities: every phrase whose entity has boxes; `image_ids` None = every annotation file.

    `root` holds `Sentences/` and `Annotations/`; images are `<image_root>/<id>.jpg`.
    """
    root = Path(root)
    ids = (
        sorted(image_ids)
        if image_ids is not None
        else sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    )
    samples = []
    for image_id in ids:
        width, height, entity_boxes = _flickr_boxes(root / "Annotations" / f"{image_id}.xml")
        lines = (root / "Sentences" / f"{image_id}.txt").read_text(encoding="utf-8").splitlines()
        for sentence_index, line in enumerate(lines):
            for match in _PHRASE.finditer(line):
                boxes = entity_boxes.get(match["entity"])
                if not boxes:
                    continue  # "notvisual" / scene entities carry no box
                samples.append(
                    RecSample(
                        sample_id=f"{image_id}-{sentence_index}-{match['entity']}",
                        image_path=_resolve(Path(image_root), f"{image_id}.jpg"),
                        expression=match["text"].strip(),
                        boxes=tuple(boxes),
                        width=width,
                        height=height,
                        tags={"types": match["types"].split("/")},
                    )
                )
    return samples


def _flickr_boxes(path: Path) -> tuple[int, int, dict[str, list[Box]]]:
    try:
        tree = ElementTree.parse(path)
    except (OSError, ElementTree.ParseError) as error:
        raise RecDataError(f"{path}: {error}") from error
    size = tree.find("size")
    width = int(size.findtext("width", "0")) if size is not None else 0
    height = int(size.findtext("height", "0")) if size is not None else 0
    boxes: dict[str, list[Box]] = {}
    for obj in tree.iter("object"):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            continue
        # VOC boxes are inclusive 1-based pixel indices: xmin - 1 .. xmax covers the drawn pixels.
        x1, y1, x2, y2 = (float(bndbox.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax"))
        for name in obj.iter("name"):
            boxes.setdefault((name.text or "").strip(), []).append(Box(x1 - 1, y1 - 1, x2, y2))
    return width, height, boxes


# --- helpers ----------------------------------------------------------------------------------------


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RecDataError(f"{path}: {error}") from error


def _xyxy(values: Any, where: str) -> Box:
    try:
        x1, y1, x2, y2 = (float(v) for v in values)
    except (TypeError, ValueError) as error:
        raise RecDataError(f"{where}: a box must be four numbers, got {values!r}") from error
    if not (x1 < x2 and y1 < y2):
        raise RecDataError(f"{where}: empty or inverted box {values!r}")
    return Box(x1, y1, x2, y2)


def _resolve(root: Path, file_name: str) -> str:
    return file_name if os.path.isabs(file_name) or "://" in file_name else str(root / file_name)


def read_any(path: str | os.PathLike[str], **kwargs: Any) -> list[RecSample]:
    """Read `path` by what it is: an `spr-rec/v1` JSON, a refer-toolkit folder, a Flickr30k Entities folder.

    A refer folder holds `instances.json` and one `refs(*).p`; kwargs: `image_root`, `split`.
    """
    path = Path(path)
    if path.is_file():
        return read_spr_rec(path)
    if (path / "Sentences").is_dir() and (path / "Annotations").is_dir():
        return read_flickr30k_entities(path, kwargs.get("image_root", path / "flickr30k-images"))
    refs = sorted(path.glob("refs*.p")) + sorted(path.glob("refs*.json"))
    if (path / "instances.json").is_file() and refs:
        image_root = kwargs.get("image_root", path / "images")
        return read_refcoco(refs[0], path / "instances.json", image_root, kwargs.get("split", "test"))
    raise RecDataError(
        f"{path}: neither an {SPR_REC_FORMAT} file, a refer folder nor a Flickr30k Entities folder"
    )
