"""A COCO `instances_*.json` checked field by field before pycocotools sees it: every problem that would
run with wrong numbers (no annotations, a NaN or negative box, a duplicate image id, an unknown category,
two categories of one name) or end deep inside pycocotools (a missing field, a box of three numbers, string
ids, a top-level list, a file nested 100,000 deep) is one `BadInput` naming the file and the field."""
from __future__ import annotations

import json
from pathlib import Path

from ...runtime.errors import BadInput
from ...runtime.validation import is_int, is_number, regular_file

MAX_BYTES = 2 << 30  # COCO 2017's instances_train is 450 MB


def read_coco(path) -> dict:
    """The annotation file at `path`, parsed and checked (`check_coco`).

    Returns:
        The JSON object, as pycocotools' `COCO.dataset` takes it.

    Raises:
        BadInput: the file cannot be read, is not JSON, or fails a check (naming the field).
    """
    path = regular_file(path)
    if path.stat().st_size > MAX_BYTES:
        raise BadInput(path, f"{path.stat().st_size} bytes: larger than any COCO annotation file ({MAX_BYTES})")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise BadInput(path, f"not a COCO annotation file: not JSON ({str(e)[:80]})") from None
    check_coco(path, data)
    return data


def check_coco(path: Path, data) -> None:
    """`BadInput(path, field: problem)` unless `data` is a usable COCO detection annotation object."""
    if not isinstance(data, dict):
        raise BadInput(path, f"not a COCO annotation file: a JSON {type(data).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise BadInput(path, f"{key}: missing or not a list")
    images = _unique_ids(path, "images", data["images"], "file_name")
    categories = _unique_ids(path, "categories", data["categories"], "name")
    names = [c["name"] for c in data["categories"]]
    if len(set(names)) != len(names):
        raise BadInput(path, f"categories: the name {_first_repeat(names)!r} is given twice")
    if not data["annotations"]:
        raise BadInput(path, "annotations: none (every metric would be 0)")
    for n, ann in enumerate(data["annotations"]):
        _check_annotation(path, f"annotations[{n}]", ann, images, categories)


def _unique_ids(path, key: str, items: list, text_field: str) -> set:
    """The ids of `items`, each an object with an integer "id", unique, and a string `text_field`."""
    ids = set()
    for n, item in enumerate(items):
        where = f"{key}[{n}]"
        if not isinstance(item, dict):
            raise BadInput(path, f"{where}: not an object")
        if not is_int(item.get("id")):
            raise BadInput(path, f"{where}.id: missing or not an integer")
        if not isinstance(item.get(text_field), str):
            raise BadInput(path, f"{where}.{text_field}: missing or not a string")
        if item["id"] in ids:
            raise BadInput(path, f"{where}.id: {item['id']} is given twice")
        ids.add(item["id"])
    return ids


def _check_annotation(path, where: str, ann, images: set, categories: set) -> None:
    if not isinstance(ann, dict):
        raise BadInput(path, f"{where}: not an object")
    for field, known, what in (("image_id", images, "image"), ("category_id", categories, "category")):
        if not is_int(ann.get(field)):
            raise BadInput(path, f"{where}.{field}: missing or not an integer")
        if ann[field] not in known:
            raise BadInput(path, f"{where}.{field}: no {what} has id {ann[field]}")
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(is_number(v) for v in box)):
        raise BadInput(path, f"{where}.bbox: {str(box)[:60]} is not [x, y, width, height] of 4 finite numbers")
    if box[2] < 0 or box[3] < 0:
        raise BadInput(path, f"{where}.bbox: negative width or height {box[2:]}")
    if not (is_number(ann.get("area")) and ann["area"] >= 0):
        raise BadInput(path, f"{where}.area: missing or not a finite number >= 0")
    if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd", 0), bool):
        raise BadInput(path, f"{where}.iscrowd: {str(ann.get('iscrowd'))[:20]} is not 0 or 1")


def _first_repeat(values: list):
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None
