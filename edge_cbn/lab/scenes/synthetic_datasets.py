"""Write synthetic shape scenes (`synthetic_scenes`) as the datasets a user would bring: COCO detection
annotations and the VOC2012 segmentation layout, so that the shipped `yolo_shapes` / `fcn_shapes` models are
measured through the same readers as a real dataset.

    OUT/coco/annotations/instances_{split}.json   images, annotations (bbox [x, y, w, h] of the visible
    OUT/coco/{split}/{split}_00000.jpg             pixels, area = their count, iscrowd 0, polygons), categories
    OUT/VOC2012/JPEGImages/{split}_00000.jpg
    OUT/VOC2012/SegmentationClass/{split}_00000.png   palette PNG: 0 background, 1..5 the shape classes,
    OUT/VOC2012/ImageSets/Segmentation/{split}.txt    255 on the 2-pixel band along every label change

Splits: `val` (evaluation) and `train` (calibration images: never the evaluation set); the models were
trained on a third, disjoint stream of scenes.  Category id / mask value `i + 1` is `SHAPE_CLASSES[i]`.

A set on other backgrounds than the photos (`backgrounds="procedural"`) says so where an evaluation can read
it: the COCO files' "info" ("backgrounds") and `OUT/scenes.json`.  A photo set keeps the bytes it always
had: no such key or file means photos."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from ...convert.models.shape_classes import SHAPE_CLASSES
from ...stream.overlay import voc_palette
from .synthetic_scenes import check_backgrounds, scenes

JPEG_QUALITY = 95


def polygons(mask: np.ndarray) -> list:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] of the outer contours of a bool mask (3+ points each)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def coco_annotations(scene, image_id: int, first_id: int) -> list[dict]:
    """The COCO annotation records of one scene's shapes, ids counting from `first_id`."""
    records = []
    for k, (class_id, mask, box) in enumerate(zip(scene.class_ids, scene.masks, scene.boxes())):
        records.append({"id": first_id + k, "image_id": image_id, "category_id": class_id + 1,
                        "bbox": [float(v) for v in box], "area": float(mask.sum()), "iscrowd": 0,
                        "segmentation": polygons(mask)})
    return records


BACKGROUND_NOTES = {  # what each `backgrounds` is, in scenes.json
    "photos": "random crops of the 19 bundled photos, the backgrounds the models were trained on",
    "procedural": "seeded procedural textures (fractal value noise, sinusoid plaids, Voronoi cells, random-walk "
                  "blobs, colour gradients, some blended in pairs): no pixel from the photos the models trained on"}


def coco_info(split: str, seed: int, backgrounds: str) -> dict:
    info = {"description": f"edge-cbn synthetic shapes, split {split}, seed {seed}", "version": "1"}
    if backgrounds != "photos":  # photo sets keep their bytes
        info["description"] += f", {backgrounds} backgrounds"
        info["backgrounds"] = backgrounds
    return info


def coco_document(split: str, seed: int, images: list, annotations: list, backgrounds: str = "photos") -> dict:
    return {"info": coco_info(split, seed, backgrounds),
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                           for i, name in enumerate(SHAPE_CLASSES)]}


def write_palette_png(path: Path, labels: np.ndarray) -> None:
    """A VOC-style indexed PNG: pixel values are class ids, the palette is VOC's."""
    from PIL import Image  # lazy: PIL, only when the segmentation masks are written

    image = Image.fromarray(labels)
    image.putpalette(voc_palette().reshape(-1).tolist())  # turns the "L" image into a "P" one
    image.save(path)


def write_split(out: Path, split: str, seed: int, count: int, hw, backgrounds: str = "photos") -> None:
    """Scenes 0 .. count-1 of `split` on `backgrounds` into both layouts under `out`."""
    coco_dir, voc = out / "coco", out / "VOC2012"
    for d in (coco_dir / "annotations", coco_dir / split, voc / "JPEGImages", voc / "SegmentationClass",
              voc / "ImageSets" / "Segmentation"):
        d.mkdir(parents=True, exist_ok=True)
    images, annotations, names = [], [], []
    for i, scene in enumerate(scenes(seed, split, count, hw, backgrounds=backgrounds)):
        name = f"{split}_{i:05d}"
        jpeg = cv2.imencode(".jpg", scene.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
        for path in (coco_dir / split / f"{name}.jpg", voc / "JPEGImages" / f"{name}.jpg"):
            path.write_bytes(jpeg.tobytes())
        write_palette_png(voc / "SegmentationClass" / f"{name}.png", scene.label_map())
        images.append({"id": i + 1, "file_name": f"{name}.jpg", "height": hw[0], "width": hw[1]})
        annotations += coco_annotations(scene, i + 1, len(annotations) + 1)
        names.append(name)
    document = coco_document(split, seed, images, annotations, backgrounds)
    (coco_dir / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def write_manifest(out: Path, seed: int, counts: dict, hw, backgrounds: str) -> None:
    """OUT/scenes.json: what the folder holds, for an evaluation to report what it ran on."""
    manifest = {"generator": "edge_cbn.lab.scenes.synthetic_scenes", "backgrounds": backgrounds,
                "note": BACKGROUND_NOTES[backgrounds], "seed": seed, "splits": counts, "height": hw[0], "width": hw[1]}
    (out / "scenes.json").write_text(json.dumps(manifest, indent=1) + "\n")


def write_datasets(out, *, seed: int = 0, val: int = 500, train: int = 200, hw=(160, 160),
                   backgrounds: str = "photos") -> Path:
    """The `val` and `train` (calibration) splits on `backgrounds` (BACKGROUNDS) in the COCO and VOC layouts
    under `out`; returns it."""
    check_backgrounds(backgrounds)  # before any folder is made
    out = Path(out)
    counts = {"val": val, "train": train}
    for split, count in counts.items():
        write_split(out, split, seed, count, hw, backgrounds)
    if backgrounds != "photos":  # photo sets keep the files they always had
        write_manifest(out, seed, counts, hw, backgrounds)
    return out
