"""Labelled datasets in their standard layouts, read for `edge-cbn evaluate TASK`: an ImageNet-style
folder or a folder plus a labels CSV (classification), COCO `instances_*.json` plus images (detection),
VOC2012 (segmentation); and the calibration images, which must never be evaluation images.

A `Sample` is an image path and its truth: a class index, a COCO image id, or the path of a class mask.
Nothing here runs a model; a problem with the data is a `BadInput` naming the file (one line on the CLI),
found when the dataset is read, before a sweep starts: every image and mask is checked without decoding
(a regular file, not truncated, within the pixel bound: `runtime.images.check_image`), text files must be
UTF-8, and a COCO file is checked field by field (`coco_file`)."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np

from ...convert.offline_calibration import IMAGE_SUFFIXES, image_files  # light: imports no TensorFlow
from ...runtime.errors import BadInput
from ...runtime.images import check_image, header_size, read_image
from ...runtime.labels import load_labels
from ...runtime.validation import regular_file
from .coco_file import read_coco

VOC_IGNORE = 255  # VOC's "void" label: object borders and difficult regions, never scored


@dataclasses.dataclass(frozen=True)
class Sample:
    path: Path
    truth: object  # class index (classification), image id (detection), mask path (segmentation)


@dataclasses.dataclass
class Dataset:
    task: str
    name: str  # what the report calls it
    samples: list[Sample]
    coco: object = None  # detection: the pycocotools COCO of the annotations
    source: Path | None = None  # the annotation / label file behind the truth, part of the fingerprint

    def fingerprint(self) -> str:
        """sha1 of what the metric depends on (the samples, their truth, the annotation file's bytes): the
        dataset part of a cache key."""
        h = hashlib.sha1(self.task.encode())
        for s in self.samples:
            h.update(f"{s.path}\0{s.truth}\n".encode())
        if self.source is not None:
            h.update(Path(self.source).read_bytes())
        return h.hexdigest()


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet wnids in class-index order (torchvision's and Keras' order: sorted wnids)."""
    return load_labels("imagenet_wnids")


def class_folder(root, labels=()) -> Dataset:
    """`root/<class>/*.JPEG`: each folder's images labelled with its class's index, the folder name being
    one of the model's `labels` (a model of your own: `circle/`, `square/`) or else an ImageNet wnid (the
    index among the 1000, not the folder's rank among those present, which is wrong for a subset)."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    own = {name: i for i, name in enumerate(labels)}
    index = own if folders and all(p.name in own for p in folders) else {
        w: i for i, w in enumerate(imagenet_wnids())}
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise BadInput(root, f"folders that are neither the model's labels nor ImageNet wnids: {', '.join(unknown[:5])} "
                             "(use --labels CSV for other class names)")
    samples = [Sample(f, index[d.name]) for d in folders for f in _images_in(d)]
    if not samples:
        raise BadInput(root, "no images in <class>/ folders")
    return _checked(Dataset("classification", root.name, samples))


def class_csv(root, labels_csv) -> Dataset:
    """Images of `root` named in `labels_csv`, rows `file,class` with class an index or a wnid (a first row
    whose class is neither is a header)."""
    root, labels_csv = Path(root), Path(labels_csv)
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    try:
        rows = [r for r in csv.reader(io.StringIO(_text(labels_csv), newline="")) if r and any(c.strip() for c in r)]
    except csv.Error as e:
        raise BadInput(labels_csv, f"not a CSV file ({e})") from None
    samples = []
    for n, row in enumerate(rows):
        name, label = (row + [""])[:2]
        label = label.strip()
        if label.isdigit() or label in index:
            samples.append(Sample(root / name.strip(), int(label) if label.isdigit() else index[label]))
        elif n > 0:
            raise BadInput(labels_csv, f"row {n + 1}: {label!r} is neither a class index nor an ImageNet wnid")
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing or not samples:
        raise BadInput(labels_csv, f"names images that are not in {root}: {missing[0]}" if missing else "no rows")
    return _checked(Dataset("classification", root.name, samples, source=labels_csv))


def _text(path) -> str:
    """A text file's content; `BadInput` when it is not a readable UTF-8 text file."""
    try:
        return regular_file(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInput(path, "not a text file (not UTF-8)") from None
    except OSError as e:
        raise BadInput(path, f"cannot be read: {e.strerror or e}") from None


def _checked(dataset: Dataset) -> Dataset:
    """`dataset` once every image and mask passed `check_image` (before a sweep starts, not after it)."""
    for sample in dataset.samples:
        check_image(sample.path)
        if dataset.task == "segmentation":
            check_image(sample.truth)
            if (header_size(sample.truth) or ("",))[0] != "png":
                raise BadInput(sample.truth, "a class mask must be a PNG (VOC's palette PNGs)")
    return dataset


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def coco_detection(annotations, images) -> Dataset:
    """COCO `instances_*.json` and its image folder: one sample per annotated image (its id the truth),
    every image the annotation file lists, in id order."""
    coco = load_coco(annotations)
    images = Path(images)
    samples = [Sample(images / coco.imgs[i]["file_name"], i) for i in sorted(coco.getImgIds())]
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing or not samples:
        raise BadInput(annotations, f"lists images missing from {images}: {missing[0]}" if missing else "no images")
    return _checked(Dataset("detection", Path(annotations).stem, samples, coco=coco, source=Path(annotations)))


def load_coco(annotations):
    """pycocotools' COCO of `annotations`, checked field by field first (`coco_file.read_coco`: one line
    naming the file and the field), its own progress messages kept off stdout (the JSON line)."""
    try:
        from pycocotools.coco import COCO  # lazy: pycocotools is optional (the [eval] extra), detection only
    except ImportError:
        raise BadInput(annotations, "detection metrics need pycocotools: pip install 'edge-cbn[eval]'") from None
    data = read_coco(annotations)  # every field pycocotools and the metric rely on, checked first
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def voc_split_ids(voc_root, split: str) -> list[str]:
    """Image ids of `ImageSets/Segmentation/<split>.txt`."""
    path = Path(voc_root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        raise BadInput(path, "no such split file (VOC2012 layout: ImageSets/Segmentation/<split>.txt)")
    return [line.split()[0] for line in _text(path).splitlines() if line.strip()]


def voc_segmentation(voc_root, split: str = "val") -> Dataset:
    """VOC2012: `JPEGImages/<id>.jpg` with the palette PNG `SegmentationClass/<id>.png` of each id in the split."""
    root = Path(voc_root)
    samples = [Sample(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png")
               for i in voc_split_ids(root, split)]
    missing = [p for s in samples for p in (s.path, s.truth) if not p.is_file()]
    if missing or not samples:
        raise BadInput(root, f"split {split!r} names files that are missing: {missing[0]}" if missing
                       else f"split {split!r} is empty")
    return _checked(Dataset("segmentation", f"{root.name}/{split}", samples))


def voc_images(voc_root, split: str) -> list[Path]:
    """The JPEG images of a VOC split (calibration needs no masks)."""
    return [Path(voc_root) / "JPEGImages" / f"{i}.jpg" for i in voc_split_ids(voc_root, split)]


def read_mask(path) -> np.ndarray:
    """A class-index mask: a palette ("P") or greyscale PNG's indices as they are (VOC's palette PNGs; an
    RGB rendering of the colours is refused, as its values are not class indices)."""
    from PIL import Image  # lazy: PIL, only for segmentation masks

    check_image(path)  # a regular file, not truncated, within the pixel bound: before PIL decodes it
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise BadInput(path, f"a class mask must be a palette or greyscale PNG, not mode {im.mode}")
            return np.asarray(im, np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadInput(path, f"not a readable mask ({type(e).__name__}: {str(e)[:80]})") from None


def read_bgr(path) -> np.ndarray:
    """An image as BGR uint8, the frame the device pipeline takes; an unreadable one is a BadInput."""
    bgr = read_image(path)  # a regular file (a FIFO named .JPEG would block), within the pixel bound
    if bgr is None:
        raise BadInput(path, "cannot read this image")
    return bgr


def listed_images(list_file) -> list[Path]:
    """A split file: one image path per line, relative to the file's folder unless absolute."""
    list_file = Path(list_file)
    files = [list_file.parent / line.strip() for line in _text(list_file).splitlines() if line.strip()]
    missing = [f for f in files if not f.is_file()]
    if missing or not files:
        raise BadInput(list_file, f"names an image that does not exist: {missing[0]}" if missing else "lists no images")
    return files


def calibration_images(*, calib_dir=None, calib_list=None, voc_root=None, calib_split=None) -> list[Path]:
    """The calibration images from exactly one source: a folder (recursive), a split file, or a VOC split."""
    given = [v for v in (calib_dir, calib_list, calib_split) if v]
    if len(given) != 1:
        raise BadInput("calibration images", "give exactly one of --calib-dir, --calib-list"
                       + (", --calib-split" if voc_root else ""))
    if calib_dir:
        try:
            return image_files(calib_dir)
        except ValueError as e:
            raise BadInput(calib_dir, str(e)) from None
    return listed_images(calib_list) if calib_list else voc_images(voc_root, calib_split)


def check_disjoint(calibration: list[Path], dataset: Dataset) -> None:
    """Refuse calibration images that are evaluation images: the same file, or a copy of one (same name
    and size; a stat, not a read, so it stays cheap on 50,000 images)."""
    def identity(p: Path):
        st = p.stat()
        return p.name, st.st_size

    evaluated = {s.path.resolve() for s in dataset.samples}
    same = [p for p in calibration if p.resolve() in evaluated]
    if not same:
        copies = {identity(s.path) for s in dataset.samples}
        same = [p for p in calibration if identity(p) in copies]
    if same:
        raise BadInput(same[0], f"is an evaluation image too ({len(same)} calibration images are): calibrate on "
                                "a separate folder or split, never on the evaluation set")


def subset(samples: list, limit: int | None, seed: int = 0) -> list:
    """A seeded random `limit` of `samples`, in their original order (the same subset every run; the first
    N of a class-sorted folder would be a few classes only)."""
    if not limit or limit >= len(samples):
        return list(samples)
    keep = np.sort(np.random.default_rng(seed).permutation(len(samples))[:limit])
    return [samples[i] for i in keep]


def calibration_frames(files: list[Path], n: int, seed: int = 0) -> list[Path]:
    """`n` calibration frames: the files in a seeded random order, cycled when there are fewer than `n`."""
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[order[i % len(files)]] for i in range(n)]
