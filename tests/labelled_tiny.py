"""Tiny models of the three tasks and tiny datasets in the standard layouts (ImageNet folder, COCO
instances JSON, VOC2012), with known truth, for the labelled-evaluation tests."""
import json
from pathlib import Path

import cv2
import numpy as np

SIDE = 32  # detector / segmenter input
HEAD = {"anchors": [[4, 4], [6, 8], [8, 6], [8, 12], [12, 8], [12, 12], [16, 16], [20, 24], [28, 28]],
        "masks": [[6, 7, 8], [3, 4, 5], [0, 1, 2]], "strides": [32, 16, 8]}
DARKNET = {"mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0], "letterbox": True}
SEG_PRE = {"mean": [120.0, 110.0, 100.0], "std": [60.0, 58.0, 57.0], "letterbox": False}
# The first four ImageNet classes (indices 0-3) and index 7 ("cock"), for subset folders.
WNIDS = {0: "n01440764", 1: "n01443537", 2: "n01484850", 3: "n01491361", 7: "n01514668"}


def tiny_detector(num_classes=2, seed=0):
    """Conv+BN stem at strides 2-32 with a YOLO head (3 anchors x (5 + C)) at strides 32, 16, 8."""
    import keras
    from keras import layers
    from tiny import conv_bn

    from edge_cbn.convert.weights.assign import assign_state_dict, random_state_dict

    inp = keras.Input((SIDE, SIDE, 3), name="input")
    x = conv_bn(inp, 8, 3, 2, "s2")
    x = conv_bn(x, 8, 3, 2, "s4")
    p8 = conv_bn(x, 8, 3, 2, "s8")
    p16 = conv_bn(p8, 8, 3, 2, "s16")
    p32 = conv_bn(p16, 8, 3, 2, "s32")
    outs = [layers.Conv2D(3 * (5 + num_classes), 1, name=f"head{s}")(p) for s, p in ((32, p32), (16, p16), (8, p8))]
    model = keras.Model(inp, outs)
    assign_state_dict(model, random_state_dict(model, seed))
    return model


def tiny_segmenter(num_classes=3, seed=0):
    """Conv+BN at stride 2, a 1x1 classifier, bilinear upsampling back to the input size."""
    import keras
    from keras import layers
    from tiny import conv_bn

    from edge_cbn.convert.weights.assign import assign_state_dict, random_state_dict

    inp = keras.Input((SIDE, SIDE, 3), name="input")
    x = conv_bn(inp, 8, 3, 2, "s2")
    x = conv_bn(x, 8, 3, 1, "s2b")
    x = layers.Conv2D(num_classes, 1, name="classifier")(x)
    model = keras.Model(inp, layers.UpSampling2D(2, interpolation="bilinear", name="up")(x))
    assign_state_dict(model, random_state_dict(model, seed))
    return model


def write_image(path, size, rng):
    """A random image of `size` (h, w) at `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 256, (*size, 3), np.uint8))
    return Path(path)


def images(folder, n, rng, size=(24, 30), prefix="img", ext=".png"):
    """`n` random images written into `folder`; their paths."""
    return [write_image(Path(folder) / f"{prefix}{i:03d}{ext}", size, rng) for i in range(n)]


def imagenet_folder(root, classes, per_class, rng):
    """root/<wnid>/*.png for each class index in `classes`; {path: class index}."""
    truth = {}
    for c in classes:
        for p in images(Path(root) / WNIDS[c], per_class, rng, prefix=f"c{c}_", ext=".JPEG"):
            truth[p] = c
    return truth


def coco_dataset(root, boxes_per_image, categories, rng, size=(40, 48)):
    """images/ and instances_val.json with `boxes_per_image` [[(category id, [x, y, w, h]), ...], ...];
    categories [(id, name)].  Returns (annotation path, image folder)."""
    root = Path(root)
    paths = images(root / "images", len(boxes_per_image), rng, size=size)
    anns, imgs = [], []
    for i, (p, boxes) in enumerate(zip(paths, boxes_per_image), start=1):
        imgs.append({"id": i, "file_name": p.name, "height": size[0], "width": size[1]})
        for cat, box in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": list(map(float, box)),
                         "area": float(box[2] * box[3]), "iscrowd": 0})
    ann = root / "instances_val.json"
    ann.write_text(json.dumps({"images": imgs, "annotations": anns,
                               "categories": [{"id": i, "name": n, "supercategory": "x"} for i, n in categories]}))
    return ann, root / "images"


def voc_palette():
    """VOC's colour map (the devkit's bit-interleaving), 256 RGB entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def voc_dataset(root, masks: dict, train_ids, rng):
    """VOC2012 layout: JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette PNG), and the splits
    val (the ids of `masks`) and train (`train_ids`, images only)."""
    from PIL import Image

    root = Path(root)
    (root / "SegmentationClass").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i, mask in masks.items():
        write_image(root / "JPEGImages" / f"{i}.jpg", mask.shape, rng)
        im = Image.fromarray(mask.astype(np.uint8), mode="P")
        im.putpalette(voc_palette())
        im.save(root / "SegmentationClass" / f"{i}.png")
    for i in train_ids:
        write_image(root / "JPEGImages" / f"{i}.jpg", (20, 26), rng)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(masks) + "\n")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(train_ids) + "\n")
    return root


def exported(task, folder):
    """(Keras model, exported .tflite path) of a tiny model of `task`."""
    from tiny import PRE, tiny_model

    from edge_cbn.convert.export import export

    if task == "classification":
        model, pre, labels, head = tiny_model(num_classes=4), PRE, list("abcd"), None
    elif task == "detection":
        model, pre, labels, head = tiny_detector(2), DARKNET, ["cat", "dog"], HEAD
    else:
        model, pre, labels, head = tiny_segmenter(3), SEG_PRE, ["background", "a", "b"], None
    path = export(model, Path(folder) / f"{task}.tflite", name=f"tiny_{task}", task=task, preprocess=pre,
                  labels=labels, head=head)
    return model, path


def run_cli(task, model_path, out, *args):
    """`edge-cbn evaluate TASK` on a tiny model with small settings; (result, the final JSON line or None)."""
    from click.testing import CliRunner

    from edge_cbn.lab.evaluate.command import main

    res = CliRunner().invoke(main, [task, "--model", str(model_path), "--out", str(out), "--num-threads", "1",
                                    "--cal-frames", "6", "--noise-states", "2", *args])
    lines = res.stdout.strip().splitlines()
    return res, json.loads(lines[-1]) if res.exit_code == 0 and lines else None


def cells(out, metric):
    """{(eta, method): (mean, std)} of the JSON line's rows."""
    return {(r["eta"], r["method"]): (r[f"{metric}_mean"], r[f"{metric}_std"]) for r in out["rows"]}
