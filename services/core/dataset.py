"""COCO-format datasets (Objects365, COCO, LVIS, ...): SPEC §2 "Data".

One bad record never sinks a file: every record is validated and a rejected one is reported with
its reason in ``bad_records``; a box that only needed clipping to its image is kept and reported in
``repaired``. Images are referenced by URI (``file://`` for local paths), never loaded here.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.boxes import AnnotatedBox, Box, sanitize_box

_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_IMAGE_URL_KEYS = ("coco_url", "flickr_url", "url")  # LVIS has coco_url and no file_name


class DatasetError(ValueError):
    """The file as a whole cannot be read (missing, not JSON, not a COCO object)."""


@dataclass(frozen=True, slots=True)
class ImageRecord:
    image_id: int
    uri: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class RecordIssue:
    section: str  # "images", "annotations", "categories" or "file"
    index: int  # position in its section's list; -1 for the file itself
    record_id: str | None  # the record's "id" as written, when it had one
    reason: str


@dataclass(slots=True)
class CocoDataset:
    dataset_id: str
    images: dict[int, ImageRecord] = field(default_factory=dict)
    objects_by_image: dict[int, list[AnnotatedBox]] = field(default_factory=dict)
    categories: dict[int, str] = field(default_factory=dict)
    bad_records: list[RecordIssue] = field(default_factory=list)  # rejected
    repaired: list[RecordIssue] = field(default_factory=list)  # kept after clipping the box
    skipped_crowd: int = 0  # iscrowd=1 annotations left out (a crowd box is no single object)


def read_coco(
    source: str | os.PathLike[str] | Mapping[str, Any],
    image_root: str | os.PathLike[str] | None = None,
    *,
    dataset_id: str,
    include_crowd: bool = False,
) -> CocoDataset:
    """Read a COCO-style JSON (path or already-loaded dict) into validated images and objects.

    Image URIs: an absolute ``file_name`` or one that is a URI is used as is; a relative one is joined
    to ``image_root`` (a folder or a URI prefix); without ``file_name`` (LVIS) the image's
    ``coco_url``'s file name is joined to ``image_root``, or the URL itself is used when no root is given.
    """
    data = _load(source)
    dataset = CocoDataset(dataset_id)
    root = None if image_root is None else os.fspath(image_root)
    _read_categories(_section(data, "categories", dataset), dataset)
    _read_images(_section(data, "images", dataset), root, dataset)
    _read_annotations(_section(data, "annotations", dataset), dataset, include_crowd)
    return dataset


def _load(source: str | os.PathLike[str] | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    try:
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read COCO JSON {os.fspath(source)!r}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise DatasetError(f"{os.fspath(source)!r} holds a JSON {type(data).__name__}, not a COCO object")
    return data


def _section(data: Mapping[str, Any], name: str, dataset: CocoDataset) -> list[Any]:
    records = data.get(name)
    if isinstance(records, list):
        return records
    dataset.bad_records.append(RecordIssue("file", -1, None, f"'{name}' is missing or not a list"))
    return []


# --- records --------------------------------------------------------------------------------------


def _read_categories(records: list[Any], dataset: CocoDataset) -> None:
    for index, record in enumerate(records):
        reason = _check_id(record, dataset.categories)
        if reason is None and not (isinstance(record.get("name"), str) and record["name"].strip()):
            reason = "'name' is missing or empty"
        if reason is not None:
            dataset.bad_records.append(_issue("categories", index, record, reason))
            continue
        dataset.categories[record["id"]] = record["name"].strip()


def _read_images(records: list[Any], image_root: str | None, dataset: CocoDataset) -> None:
    for index, record in enumerate(records):
        reason = _check_id(record, dataset.images) or _check_size(record)
        uri = None
        if reason is None:
            uri, reason = _image_uri(record, image_root)
        if reason is not None or uri is None:
            dataset.bad_records.append(_issue("images", index, record, reason or "no image URI"))
            continue
        image_id = record["id"]
        dataset.images[image_id] = ImageRecord(image_id, uri, int(record["width"]), int(record["height"]))
        dataset.objects_by_image[image_id] = []


def _read_annotations(records: list[Any], dataset: CocoDataset, include_crowd: bool) -> None:
    seen: set[int] = set()
    for index, record in enumerate(records):
        reason = _check_id(record, seen) or _check_annotation_refs(record, dataset)
        box = None
        if reason is None:
            box, reason = _annotation_box(record, dataset.images[record["image_id"]])
        if box is None:
            dataset.bad_records.append(_issue("annotations", index, record, reason or "no box"))
            continue
        seen.add(record["id"])
        if record.get("iscrowd") and not include_crowd:
            dataset.skipped_crowd += 1
            continue
        if reason is not None:
            dataset.repaired.append(_issue("annotations", index, record, reason))
        category = dataset.categories[record["category_id"]]
        dataset.objects_by_image[record["image_id"]].append(AnnotatedBox(record["id"], category, box))


def _issue(section: str, index: int, record: Any, reason: str) -> RecordIssue:
    record_id = record.get("id") if isinstance(record, Mapping) else None
    return RecordIssue(section, index, None if record_id is None else str(record_id), reason)


# --- checks: each returns the reason a record is rejected, or None ---------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_id(record: Any, seen: Mapping[int, Any] | set[int]) -> str | None:
    if not isinstance(record, Mapping):
        return f"record is a {type(record).__name__}, not an object"
    if not _is_int(record.get("id")):
        return "'id' is missing or not an integer"
    if record["id"] in seen:
        return f"duplicate id {record['id']}"
    return None


def _check_size(record: Mapping[str, Any]) -> str | None:
    for key in ("width", "height"):
        value: Any = record.get(key)
        if not (_is_finite_number(value) and value > 0 and float(value).is_integer()):
            return f"'{key}' is missing or not a positive integer: {value!r}"
    return None


def _check_annotation_refs(record: Mapping[str, Any], dataset: CocoDataset) -> str | None:
    image_id, category_id = record.get("image_id"), record.get("category_id")
    if not (_is_int(image_id) and image_id in dataset.images):
        return f"unknown or rejected image_id {image_id!r}"
    if not (_is_int(category_id) and category_id in dataset.categories):
        return f"unknown or rejected category_id {category_id!r}"
    return None


def _annotation_box(record: Mapping[str, Any], image: ImageRecord) -> tuple[Box | None, str | None]:
    """The ``[x, y, w, h]`` bbox as a box clipped to its image; a reason if repaired or rejected."""
    bbox = record.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
        return None, f"'bbox' is not four finite numbers: {bbox!r}"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, f"bbox has non-positive size {w:g}x{h:g}"
    box, reason = sanitize_box(x, y, x + w, y + h, image.width, image.height)
    return box, None if reason is None else f"bbox {bbox}: {reason}"


def _image_uri(record: Mapping[str, Any], image_root: str | None) -> tuple[str | None, str | None]:
    file_name = record.get("file_name")
    if isinstance(file_name, str) and file_name:
        if _URI_SCHEME.match(file_name):
            return file_name, None
        if os.path.isabs(file_name):
            return Path(file_name).as_uri(), None
        if image_root is not None:
            return _join_uri(image_root, file_name), None
    for key in _IMAGE_URL_KEYS:
        url = record.get(key)
        if isinstance(url, str) and url:
            return (url if image_root is None else _join_uri(image_root, url.rsplit("/", 1)[-1])), None
    if isinstance(file_name, str) and file_name:
        return None, f"relative file_name {file_name!r} needs an image_root"
    return None, "no file_name or image URL"


def _join_uri(root: str, relative: str) -> str:
    if _URI_SCHEME.match(root):
        return root.rstrip("/") + "/" + relative.lstrip("/")
    return (Path(root).expanduser().absolute() / relative).as_uri()
