"""Readers of the REC formats, on small hand-written files laid out as the released datasets are."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from services.core.boxes import Box
from services.evaluation.datasets import (
    RecDataError,
    read_any,
    read_flickr30k_entities,
    read_refcoco,
    read_spr_rec,
    write_spr_rec,
)

INSTANCES = {
    "images": [
        {"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 640, "height": 427},
        {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 640, "height": 480},
    ],
    "annotations": [
        {"id": 1718580, "image_id": 581857, "bbox": [103.93, 299.99, 134.22, 177.03], "category_id": 1},
        {"id": 5, "image_id": 9, "bbox": [10, 20, 30, 40], "category_id": 2},
    ],
    "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "cup"}],
}
# As in refs(unc).p: one ref per object, several sentences each, a split per ref.
REFS = [
    {
        "ref_id": 0,
        "ann_id": 1718580,
        "image_id": 581857,
        "split": "testA",
        "category_id": 1,
        "file_name": "COCO_train2014_000000581857_16.jpg",
        "sentences": [
            {"sent_id": 0, "raw": "Woman in red!", "sent": "woman in red", "tokens": ["woman", "in", "red"]},
            {"sent_id": 1, "raw": "lady on the left", "sent": "lady on the left", "tokens": []},
        ],
    },
    {
        "ref_id": 1,
        "ann_id": 5,
        "image_id": 9,
        "split": "train",
        "category_id": 2,
        "file_name": "x.jpg",
        "sentences": [{"sent_id": 2, "raw": "cup", "sent": "cup", "tokens": ["cup"]}],
    },
]


@pytest.fixture
def refer_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "refcoco"
    folder.mkdir()
    (folder / "instances.json").write_text(json.dumps(INSTANCES))
    with (folder / "refs(unc).p").open("wb") as file:
        pickle.dump(REFS, file)
    return folder


def test_refcoco_pickle_one_sample_per_sentence_of_the_split(refer_folder: Path) -> None:
    samples = read_refcoco(refer_folder / "refs(unc).p", refer_folder / "instances.json", "/coco", "testA")
    assert [s.expression for s in samples] == ["woman in red", "lady on the left"]
    first = samples[0]
    assert first.boxes == (Box(103.93, 299.99, 103.93 + 134.22, 299.99 + 177.03),)
    assert first.image_path == "/coco/COCO_train2014_000000581857.jpg"
    assert (first.width, first.height) == (640, 427) and first.sample_id == "0-0"
    everything = read_refcoco(refer_folder / "refs(unc).p", refer_folder / "instances.json", "/coco", None)
    assert len(everything) == 3


def test_refcoco_refs_as_json_and_folder_detection(refer_folder: Path) -> None:
    (refer_folder / "refs(unc).p").unlink()
    (refer_folder / "refs(google).json").write_text(json.dumps(REFS))
    samples = read_any(refer_folder, image_root="/images", split="train")
    assert [(s.expression, s.boxes) for s in samples] == [("cup", (Box(10, 20, 40, 60),))]


def test_refcoco_names_a_missing_annotation(refer_folder: Path) -> None:
    broken = [dict(REFS[0], ann_id=42)]
    (refer_folder / "refs.json").write_text(json.dumps(broken))
    with pytest.raises(RecDataError, match="missing"):
        read_refcoco(refer_folder / "refs.json", refer_folder / "instances.json", "/coco", "testA")


SENTENCES = """[/EN#18/people A man] in [/EN#19/clothing an orange hat] starring at [/EN#20/other something] .
[/EN#18/people A man] wears [/EN#19/clothing an orange hat] and [/EN#21/clothing glasses] .
"""
ANNOTATION = """<annotation>
  <filename>1000092795.jpg</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
  <object><name>18</name><bndbox><xmin>1</xmin><ymin>11</ymin><xmax>100</xmax><ymax>200</ymax></bndbox></object>
  <object><name>19</name><name>21</name>
    <bndbox><xmin>51</xmin><ymin>21</ymin><xmax>80</xmax><ymax>40</ymax></bndbox></object>
  <object><name>19</name><bndbox><xmin>301</xmin><ymin>101</ymin><xmax>320</xmax><ymax>130</ymax></bndbox></object>
  <object><name>20</name><nobndbox>1</nobndbox></object>
</annotation>
"""


@pytest.fixture
def flickr_folder(tmp_path: Path) -> Path:
    root = tmp_path / "flickr30k_entities"
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Sentences" / "1000092795.txt").write_text(SENTENCES)
    (root / "Annotations" / "1000092795.xml").write_text(ANNOTATION)
    return root


def test_flickr30k_entities_phrases_with_their_boxes(flickr_folder: Path) -> None:
    samples = read_flickr30k_entities(flickr_folder, "/flickr")
    phrases = [(s.sample_id, s.expression) for s in samples]
    assert phrases == [
        ("1000092795-0-18", "A man"),
        ("1000092795-0-19", "an orange hat"),
        ("1000092795-1-18", "A man"),
        ("1000092795-1-19", "an orange hat"),
        ("1000092795-1-21", "glasses"),
    ]  # "something" (entity 20) has no box and is left out
    hat = samples[1]
    assert hat.boxes == (Box(50, 20, 80, 40), Box(300, 100, 320, 130))  # two boxes: any may match
    assert (hat.width, hat.height) == (500, 375) and hat.image_path == "/flickr/1000092795.jpg"
    assert hat.tags == {"types": ["clothing"]}
    assert len(read_any(flickr_folder, image_root="/flickr")) == 5


def test_spr_rec_round_trip(tmp_path: Path) -> None:
    images = [{"id": 3, "file_name": "images/a.png", "width": 96, "height": 64}]
    expressions = [
        {"id": "3-1", "image_id": 3, "text": "the red circle", "boxes": [[1, 2, 30, 40]], "kind": "attribute"}
    ]
    path = write_spr_rec(tmp_path / "rec.json", "demo", images, expressions)
    (sample,) = read_spr_rec(path)
    assert sample.image_path == str(tmp_path / "images" / "a.png")
    assert sample.boxes == (Box(1, 2, 30, 40),) and sample.expression == "the red circle"
    assert (sample.width, sample.height, sample.tags) == (96, 64, {"kind": "attribute"})
    assert read_any(path) == [sample]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"format": "coco"}, "not an spr-rec/v1"),
        (
            {"format": "spr-rec/v1", "images": [], "expressions": [{"image_id": 1, "text": "x"}]},
            "unknown image",
        ),
        (
            {
                "format": "spr-rec/v1",
                "images": [{"id": 1, "file_name": "a.png"}],
                "expressions": [{"image_id": 1, "text": "x", "boxes": [[5, 5, 1, 1]]}],
            },
            "inverted",
        ),
    ],
)
def test_spr_rec_errors_say_what_is_wrong(tmp_path: Path, document: dict[str, object], message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(RecDataError, match=message):
        read_spr_rec(path)


def test_unknown_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecDataError, match="neither"):
        read_any(tmp_path)
