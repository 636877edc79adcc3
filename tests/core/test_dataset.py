from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.core import AnnotatedBox, Box, DatasetError, read_coco


def coco(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "images": [{"id": 1, "file_name": "train/0001.jpg", "width": 640, "height": 480}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40]}],
        "categories": [{"id": 3, "name": "dog"}],
    }
    data.update(overrides)
    return data


def test_reads_a_clean_file_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco()))
    dataset = read_coco(path, image_root=tmp_path / "images", dataset_id="coco-val")
    assert dataset.dataset_id == "coco-val"
    image = dataset.images[1]
    assert image.uri == (tmp_path / "images" / "train" / "0001.jpg").as_uri()
    assert (image.width, image.height) == (640, 480)
    assert dataset.categories == {3: "dog"}
    assert dataset.objects_by_image == {1: [AnnotatedBox(10, "dog", Box(10, 20, 40, 60))]}
    assert dataset.bad_records == [] and dataset.repaired == []


@pytest.mark.parametrize(
    ("image", "image_root", "uri"),
    [
        ({"file_name": "/data/a b.jpg"}, None, "file:///data/a%20b.jpg"),
        ({"file_name": "s3://bucket/a.jpg"}, "/ignored", "s3://bucket/a.jpg"),
        ({"file_name": "a.jpg"}, "s3://bucket/imgs/", "s3://bucket/imgs/a.jpg"),
        # LVIS: no file_name, the COCO URL names the file.
        ({"coco_url": "http://images.cocodataset.org/val2017/0001.jpg"}, None, "http://images.cocodataset.org/val2017/0001.jpg"),
        ({"coco_url": "http://images.cocodataset.org/val2017/0001.jpg"}, "/coco/val2017", "file:///coco/val2017/0001.jpg"),
    ],
)  # fmt: skip
def test_image_references_become_uris(image: dict[str, str], image_root: str | None, uri: str) -> None:
    record = {"id": 1, "width": 10, "height": 10, **image}
    dataset = read_coco(coco(images=[record], annotations=[]), image_root=image_root, dataset_id="d")
    assert dataset.images[1].uri == uri


def test_bad_records_are_reported_and_the_rest_is_kept() -> None:
    data = coco(
        categories=[
            {"id": 3, "name": "dog"},
            {"id": 3, "name": "dog again"},  # duplicate id
            {"id": 4},  # no name
            {"id": "5", "name": "cat"},  # id not an integer
        ],
        images=[
            {"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
            {"id": 1, "file_name": "b.jpg", "width": 640, "height": 480},  # duplicate id
            {"id": 2, "file_name": "c.jpg", "width": 0, "height": 480},  # non-positive size
            {"id": 3, "width": 10, "height": 10},  # nothing locates the image
            {"id": 4, "file_name": "d.jpg", "width": 10.5, "height": 10},  # fractional width
            "not an object",
        ],
        annotations=[
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40]},
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40]},  # duplicate id
            {"id": 11, "image_id": 99, "category_id": 3, "bbox": [1, 1, 1, 1]},  # unknown image
            {"id": 12, "image_id": 1, "category_id": 4, "bbox": [1, 1, 1, 1]},  # rejected category
            {"id": 13, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 5]},  # zero width
            {"id": 14, "image_id": 1, "category_id": 3, "bbox": [1, 1, "5", 5]},  # not numbers
            {"id": 15, "image_id": 1, "category_id": 3},  # no bbox
            {"id": 16, "image_id": 1, "category_id": 3, "bbox": [700, 1, 5, 5]},  # outside the image
            {"id": 17, "image_id": [1], "category_id": 3, "bbox": [1, 1, 5, 5]},  # unhashable image id
            {"id": 18, "image_id": 1, "category_id": 3, "bbox": [630, 470, 20, 20]},  # clipped, kept
            {"id": 19, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1},  # crowd
        ],
    )
    dataset = read_coco(data, image_root="/imgs", dataset_id="d")
    assert list(dataset.categories) == [3] and list(dataset.images) == [1]
    assert [o.annotation_id for o in dataset.objects_by_image[1]] == [10, 18]
    assert dataset.objects_by_image[1][1].box == Box(630, 470, 640, 480)
    assert [(r.section, r.index, r.record_id) for r in dataset.repaired] == [("annotations", 9, "18")]
    assert dataset.skipped_crowd == 1
    rejected = {(r.section, r.index): r.reason for r in dataset.bad_records}
    assert set(rejected) == {
        ("categories", 1), ("categories", 2), ("categories", 3),
        ("images", 1), ("images", 2), ("images", 3), ("images", 4), ("images", 5),
        ("annotations", 1), ("annotations", 2), ("annotations", 3), ("annotations", 4),
        ("annotations", 5), ("annotations", 6), ("annotations", 7), ("annotations", 8),
    }  # fmt: skip
    assert "duplicate id 3" in rejected[("categories", 1)]
    assert "'width'" in rejected[("images", 2)]
    assert "unknown or rejected image_id 99" in rejected[("annotations", 2)]
    assert "non-positive size" in rejected[("annotations", 4)]
    assert "zero area" in rejected[("annotations", 7)]


def test_relative_file_name_without_image_root_is_reported() -> None:
    dataset = read_coco(coco(annotations=[]), dataset_id="d")
    assert dataset.images == {}
    assert "needs an image_root" in dataset.bad_records[0].reason


def test_crowd_annotations_can_be_included() -> None:
    data = coco(annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1}])
    assert len(read_coco(data, "/imgs", dataset_id="d", include_crowd=True).objects_by_image[1]) == 1


def test_missing_sections_are_reported_not_fatal() -> None:
    dataset = read_coco({"images": []}, dataset_id="d")
    assert [r.reason for r in dataset.bad_records] == [
        "'categories' is missing or not a list",
        "'annotations' is missing or not a list",
    ]


def test_unreadable_files_raise_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        read_coco(tmp_path / "missing.json", dataset_id="d")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read"):
        read_coco(tmp_path / "bad.json", dataset_id="d")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DatasetError, match="not a COCO object"):
        read_coco(tmp_path / "list.json", dataset_id="d")
