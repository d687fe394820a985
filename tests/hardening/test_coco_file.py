"""Broken COCO annotation files (`lab/evaluate/coco_file.py`): each is one line naming the file and the
field, before a sweep starts, instead of a table of wrong numbers with exit 0 or an internal error after
the whole sweep."""
import copy
import json

import pytest

from edge_cbn.lab.evaluate.coco_file import read_coco
from edge_cbn.runtime.errors import BadInput

pytestmark = pytest.mark.hardening

GOOD = {"images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 48},
                   {"id": 2, "file_name": "b.jpg", "height": 40, "width": 48}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 8.0], "area": 80.0,
                         "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 4, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}],
        "categories": [{"id": 3, "name": "circle"}, {"id": 4, "name": "square"}]}


def changed(edit):
    data = copy.deepcopy(GOOD)
    edit(data)
    return data


CASES = {  # name: (the file's JSON, or raw bytes; the reason expected)
    "no-annotations": (changed(lambda d: d.update(annotations=[])), "annotations: none"),
    "nan-box": (changed(lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 3])), "4 finite numbers"),
    "inf-box": (changed(lambda d: d["annotations"][0].update(bbox=[1, 2, float("inf"), 3])), "4 finite numbers"),
    "negative-box": (changed(lambda d: d["annotations"][1].update(bbox=[1, 2, -5, 3])), "negative width"),
    "duplicate-image-id": (changed(lambda d: d["images"][1].update(id=1)), "images[1].id: 1 is given twice"),
    "unknown-category": (changed(lambda d: d["annotations"][0].update(category_id=9)), "no category has id 9"),
    "unknown-image": (changed(lambda d: d["annotations"][0].update(image_id=7)), "no image has id 7"),
    "duplicate-category-name": (changed(lambda d: d["categories"][1].update(name="circle")), "'circle' is given twice"),
    "missing-categories": (changed(lambda d: d.pop("categories")), "categories: missing"),
    "missing-file-name": (changed(lambda d: d["images"][0].pop("file_name")), "images[0].file_name: missing"),
    "missing-bbox": (changed(lambda d: d["annotations"][0].pop("bbox")), "annotations[0].bbox"),
    "missing-area": (changed(lambda d: d["annotations"][0].pop("area")), "annotations[0].area"),
    "three-number-box": (changed(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])), "4 finite numbers"),
    "huge-integer-box": (changed(lambda d: d["annotations"][0].update(bbox=[1, 2, 10 ** 400, 3])), "4 finite numbers"),
    "string-box": (changed(lambda d: d["annotations"][0].update(bbox=["1", "2", "3", "4"])), "4 finite numbers"),
    "string-image-ids": (changed(lambda d: [i.update(id=str(i["id"])) for i in d["images"]]), "images[0].id"),
    "mixed-image-ids": (changed(lambda d: d["images"][1].update(id="2")), "images[1].id"),
    "boolean-id": (changed(lambda d: d["categories"][0].update(id=True)), "categories[0].id"),
    "iscrowd-2": (changed(lambda d: d["annotations"][0].update(iscrowd=2)), "iscrowd"),
    "top-level-list": ([GOOD], "a JSON list, not an object"),
    "deep-nesting": (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    "not-json": (b"\x89PNG\r\n\x1a\n", "not JSON"),
    "annotation-not-an-object": (changed(lambda d: d["annotations"].append(5)), "annotations[2]: not an object"),
}


@pytest.mark.parametrize("name", CASES)
def test_a_broken_annotation_file_is_one_line_naming_the_field(tmp_path, name):
    content, reason = CASES[name]
    path = tmp_path / f"{name}.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(BadInput) as error:
        read_coco(path)
    message = str(error.value)
    assert str(path) in message and reason in message and "\n" not in message, message


def test_a_good_file_passes_as_it_is(tmp_path):
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(GOOD))
    assert read_coco(path) == GOOD
