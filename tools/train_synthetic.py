#!/usr/bin/env python3
"""Train the shipped `yolo_shapes` detector and `fcn_shapes` segmenter on synthetic shape scenes, on the CPU,
and write their evaluation sets (`edge_cbn/lab/scenes/synthetic_scenes.py` draws every scene, seeded).

    python tools/train_synthetic.py make-data --out data/shapes --seed 0 --count 500
    python tools/train_synthetic.py make-data --out data/shapes-ood --seed 0 --count 500 --backgrounds procedural
    OMP_NUM_THREADS=2 nice -n 10 python tools/train_synthetic.py train yolo_shapes --data data/shapes
    python tools/train_synthetic.py check fcn_shapes --data data/shapes

`train` fits on a fixed set of scenes from the `fit` stream (never the `val` or `train` splits that `make-data`
writes), with flips and quarter turns, then saves the weights into the package
(`edge_cbn/convert/models/weights/<model>.npz`, what `edge-cbn stream --model <model>` loads) with their
model card beside them (`<model>.card.json`: command, seed, commit, data, clean metrics, sha256) and runs `check`.
`check` exports the model to TFLite and runs it through the device code (`Processor`, LiteRT) on the COCO or
VOC files of `--data`: a sanity figure (mAP@0.5 through pycocotools, or mIoU / pixel accuracy); the paper's
tables come from `edge-cbn evaluate`."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from edge_cbn.lab.scenes.synthetic_scenes import BACKGROUNDS  # the --backgrounds choices (numpy and OpenCV only)

IGNORE_IOU = 0.5  # YOLOv3: a prediction this close to an object is not pushed towards "no object"
ASSIGN_IOU = 0.5  # shape IoU (anchor vs object) above which an anchor also predicts the object


# ---------------------------------------------------------------- data
def training_scenes(task: str, seed: int, count: int):
    """(images (N, S, S, 3) uint8, targets): per scene (class ids, x1 y1 x2 y2 boxes) for detection, or
    the (N, S, S) uint8 VOC label maps for segmentation; scenes of the `fit` stream."""
    from edge_cbn.convert.models.shapes import INPUT_SIZE
    from edge_cbn.lab.scenes.synthetic_scenes import scenes

    images = np.empty((count, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    targets = [] if task == "detection" else np.empty((count, INPUT_SIZE, INPUT_SIZE), np.uint8)
    with click.progressbar(scenes(seed, "fit", count, (INPUT_SIZE, INPUT_SIZE)), length=count,
                           label=f"drawing {count} training scenes") as bar:
        for i, scene in enumerate(bar):
            images[i] = scene.image
            if task == "detection":
                boxes = scene.boxes()
                boxes[:, 2:] += boxes[:, :2]
                targets.append((np.asarray(scene.class_ids, np.int64), boxes))
            else:
                targets[i] = scene.label_map()
    return images, targets


def flip_boxes(boxes, size, flip_x, flip_y, transpose):
    """x1 y1 x2 y2 boxes through the same flips / transpose as the image."""
    b = boxes.copy()
    if transpose:
        b = b[:, [1, 0, 3, 2]]
    if flip_x:
        b[:, [0, 2]] = size - b[:, [2, 0]]
    if flip_y:
        b[:, [1, 3]] = size - b[:, [3, 1]]
    return b


def augment(rng, image, target, task):
    """A random one of the eight flips / quarter turns (every shape class is closed under them)."""
    flip_x, flip_y, transpose = rng.random(3) < 0.5
    if transpose:
        image = image.transpose(1, 0, 2)
    image = image[:, ::-1] if flip_x else image
    image = image[::-1] if flip_y else image
    if task == "detection":
        return image, (target[0], flip_boxes(target[1], image.shape[0], flip_x, flip_y, transpose))
    target = target.T if transpose else target
    target = target[:, ::-1] if flip_x else target
    return image, (target[::-1] if flip_y else target)


# ---------------------------------------------------------------- YOLO targets and loss
def yolo_targets(batch_targets, head, size, num_classes):
    """Per head map (B, H, W, A, 5 + C + 1) targets: tx, ty (offsets in the cell), tw, th (log sizes over the
    anchor), objectness, one-hot class, class weight; and (B, M, 4) padded x1 y1 x2 y2 boxes for the ignore
    mask.  Objects are assigned as `assign_object` says; class logits are also taught on `class_region`."""
    anchors = np.asarray(head["anchors"], np.float32)
    maps = [np.zeros((len(batch_targets), size // s, size // s, len(m), 6 + num_classes), np.float32)
            for m, s in zip(head["masks"], head["strides"])]
    gt = np.zeros((len(batch_targets), max([1] + [len(c) for c, _ in batch_targets]), 4), np.float32)
    for b, (classes, boxes) in enumerate(batch_targets):
        gt[b, :len(boxes)] = boxes
        for c, box in zip(classes, boxes):
            class_region(maps, b, np.eye(num_classes)[c], box, head)
        for c, box in zip(classes, boxes):  # after the regions: an assigned anchor keeps its own object
            assign_object(maps, b, np.eye(num_classes)[c], box, head, anchors)
    return maps, gt


def assign_object(maps, b, one_hot, box, head, anchors):
    """The object goes to the anchor of best shape IoU and, as darknet's `iou_thresh` does, to every other
    anchor of shape IoU above ASSIGN_IOU (more positives per object: faster training), at the cell holding
    its centre."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    inter = np.minimum(w, anchors[:, 0]) * np.minimum(h, anchors[:, 1])
    shape_iou = inter / (w * h + anchors.prod(1) - inter)
    for k in sorted(set(np.flatnonzero(shape_iou > ASSIGN_IOU)) | {int(np.argmax(shape_iou))}):
        scale = next(n for n, m in enumerate(head["masks"]) if k in m)
        stride, a, cells = head["strides"][scale], head["masks"][scale].index(k), maps[scale].shape[1]
        gx, gy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
        i, j = min(int(gy), cells - 1), min(int(gx), cells - 1)
        maps[scale][b, i, j, a, :5] = gx - j, gy - i, np.log(w / anchors[k, 0]), np.log(h / anchors[k, 1]), 1
        maps[scale][b, i, j, a, 5:] = *one_hot, 1


def class_region(maps, b, one_hot, box, head):
    """Dense class supervision (as segmentation gets): every anchor of every cell whose centre lies in the
    central half of the box learns the object's class, on both maps.  With one or two assigned anchors per
    object, the class logits otherwise learn from too few examples in a short training."""
    x1, y1, x2, y2 = box
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 4, (y2 - y1) / 4
    for scale, stride in enumerate(head["strides"]):
        centres = (np.arange(maps[scale].shape[1]) + 0.5) * stride
        rows, cols = np.abs(centres - cy) <= ry, np.abs(centres - cx) <= rx
        maps[scale][b, ..., 5:][np.ix_(rows, cols)] = (*one_hot, 1)


def box_iou_tf(tf, pred, gt):
    """IoU of (B, H, W, A, 4) boxes against (B, M, 4) boxes, x1 y1 x2 y2: (B, H, W, A, M)."""
    p, g = pred[..., None, :], gt[:, None, None, None]
    iw = tf.maximum(tf.minimum(p[..., 2], g[..., 2]) - tf.maximum(p[..., 0], g[..., 0]), 0.0)
    ih = tf.maximum(tf.minimum(p[..., 3], g[..., 3]) - tf.maximum(p[..., 1], g[..., 1]), 0.0)
    inter = iw * ih
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(p) + area(g) - inter + 1e-9)


def yolo_map_loss(tf, raw, target, gt, anchors, stride, size):
    """YOLOv3's loss on one head map, summed over the batch's cells and anchors: BCE on the centre offsets
    and squared error on the log sizes (weighted 2 - box area, small boxes count more), BCE objectness
    (except on unassigned predictions that already overlap an object), BCE classes where the class weight
    (the targets' last channel) says."""
    b, h, w = tf.shape(raw)[0], raw.shape[1], raw.shape[2]
    p = tf.reshape(raw, (b, h, w, len(anchors), -1))
    obj = target[..., 4]
    bce = tf.nn.sigmoid_cross_entropy_with_logits
    weight = obj * (2.0 - (tf.exp(target[..., 2]) * anchors[:, 0]) * (tf.exp(target[..., 3]) * anchors[:, 1])
                    / (size * size))
    xy = tf.reduce_sum(bce(target[..., 0:2], p[..., 0:2]), -1)
    wh = tf.reduce_sum(tf.square(p[..., 2:4] - target[..., 2:4]), -1)
    cy, cx = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    centre = (tf.sigmoid(p[..., 0:2]) + tf.stack([cx, cy], -1)[:, :, None]) * stride
    half = tf.exp(tf.minimum(p[..., 2:4], 4.0)) * anchors / 2
    best_iou = tf.reduce_max(box_iou_tf(tf, tf.concat([centre - half, centre + half], -1), gt), -1)
    noobj = (1.0 - obj) * tf.cast(best_iou < IGNORE_IOU, tf.float32)
    objectness = bce(obj, p[..., 4]) * (obj + noobj)
    classes = tf.reduce_sum(bce(target[..., 5:-1], p[..., 5:]), -1) * target[..., -1]
    return tf.reduce_sum(weight * (xy + wh) + objectness + classes) / tf.cast(b, tf.float32)


def segmentation_loss(tf, logits, labels):
    """Mean pixel cross-entropy, the VOC void label (255) ignored."""
    labels = tf.cast(labels, tf.int32)
    valid = tf.cast(labels != 255, tf.float32)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.where(labels == 255, 0, labels), logits)
    return tf.reduce_sum(ce * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)


# ---------------------------------------------------------------- training
MAX_OBJECTS = 8  # ignore-mask boxes per image, padded (a fixed shape: one traced training step)


def batches(rng, images, targets, spec, batch_size):
    """Endless (normalised images, targets...) batches drawn at random from the training scenes, augmented."""
    from edge_cbn.runtime.processing import normalise

    size = images.shape[1]
    while True:
        picked = [augment(rng, images[i], targets[i], spec.task)
                  for i in rng.choice(len(images), batch_size, replace=False)]
        x = normalise(np.stack([p[0] for p in picked]), spec.preprocess)
        if spec.task == "segmentation":
            yield x, (np.stack([p[1] for p in picked]),)
            continue
        maps, gt = yolo_targets([p[1] for p in picked], spec.head, size, spec.num_classes)
        padded = np.zeros((batch_size, MAX_OBJECTS, 4), np.float32)
        padded[:, :min(gt.shape[1], MAX_OBJECTS)] = gt[:, :MAX_OBJECTS]
        yield x, (*maps, padded)


def make_loss(tf, spec, size):
    """loss(model outputs, targets) for the model's task."""
    if spec.task == "segmentation":
        return lambda outputs, targets: segmentation_loss(tf, outputs, targets[0])
    anchor_sets = [np.asarray(spec.head["anchors"], np.float32)[m] for m in spec.head["masks"]]

    def loss(outputs, targets):
        *maps, gt = targets
        return sum(yolo_map_loss(tf, raw, t, gt, a, s, size)
                   for raw, t, a, s in zip(outputs, maps, anchor_sets, spec.head["strides"]))
    return loss


def train(name: str, *, steps: int, batch_size: int, scene_count: int, seed: int, lr: float):
    """The registered model `name` trained from scratch on `scene_count` scenes for `steps` steps."""
    from edge_cbn.convert.tf_import import keras, tf
    from edge_cbn.convert import models

    keras.utils.set_random_seed(seed)
    spec, model = models.get_spec(name), models.build(name)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.97  # moving statistics that settle within a short run
    images, targets = training_scenes(spec.task, seed, scene_count)
    loss_fn = make_loss(tf, spec, images.shape[1])
    warmup = max(1, steps // 20)
    schedule = keras.optimizers.schedules.CosineDecay(lr / 20, steps - warmup, warmup_target=lr, warmup_steps=warmup)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=1e-4)

    @tf.function(reduce_retracing=True)
    def step(x, targets):
        with tf.GradientTape() as tape:
            loss = loss_fn(model(x, training=True), targets)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    start, running = time.time(), None
    data = batches(np.random.default_rng(seed), images, targets, spec, batch_size)
    for i in range(1, steps + 1):
        x, ys = next(data)
        loss = float(step(tf.constant(x), tuple(tf.constant(y) for y in ys)))
        running = loss if running is None else 0.98 * running + 0.02 * loss
        if i % 50 == 0 or i == steps:
            click.echo(f"step {i}/{steps}  loss {running:.4f}  {time.time() - start:.0f} s", err=True)
    return model


# ---------------------------------------------------------------- sanity check on the device path
def device_check(bundle, data: Path) -> dict:
    """The clean metric of the bundle on `data`'s val split, through the readers, device pre- and
    postprocessing and scorers of `edge-cbn evaluate` (its η 0 column, with its default thresholds)."""
    from edge_cbn.lab.evaluate import datasets
    from edge_cbn.lab.evaluate.labelled import DETECTION_THRESHOLDS, scorer_factory
    from edge_cbn.runtime.noisy_model import NoisyModel
    from edge_cbn.runtime.processing import Processor

    if bundle.meta["task"] == "detection":
        dataset = datasets.coco_detection(data / "coco" / "annotations" / "instances_val.json", data / "coco" / "val")
        proc = Processor(bundle, **DETECTION_THRESHOLDS)
    else:
        dataset, proc = datasets.voc_segmentation(data / "VOC2012", "val"), Processor(bundle)
    scorer, model = scorer_factory(bundle, dataset)(), NoisyModel(bundle)
    for i, sample in enumerate(dataset.samples):
        x, ctx = proc.preprocess(datasets.read_bgr(sample.path))
        scorer.add(sample, proc.postprocess(model.run(x, i), ctx))
    return scorer.result()


def check(name: str, data: Path, weights=None) -> dict:
    """Export `name` (the shipped weights, or `weights`) to TFLite and measure it on `data` with the
    device code."""
    from edge_cbn.convert.build import build_model, export_model
    from edge_cbn.runtime.bundle import load_bundle

    with tempfile.TemporaryDirectory() as tmp:
        spec, model = build_model(name, weights)
        bundle = load_bundle(export_model(spec, model, Path(tmp) / f"{name}.tflite"))
        return device_check(bundle, Path(data))


# ---------------------------------------------------------------- command line
@click.group()
def cli():
    """Synthetic shape scenes: datasets and the shipped detection / segmentation models."""


@cli.command("make-data")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--seed", default=0, show_default=True, help="Scene seed.")
@click.option("--count", default=500, show_default=True, help="Validation scenes.")
@click.option("--calibration-count", default=200, show_default=True, help="Calibration scenes (the train split).")
@click.option("--size", default=160, show_default=True, help="Image side in pixels.")
@click.option("--backgrounds", type=click.Choice(tuple(BACKGROUNDS)), default="photos", show_default=True,
              help="What the shapes are painted on: crops of the bundled photos (the models' training "
                   "backgrounds), or seeded procedural textures no training scene used (noise, plaids, cells, "
                   "random walks, gradients; no photo pixel): an out-of-distribution set.")
def make_data(out, seed, count, calibration_count, size, backgrounds):
    """Write the val and train (calibration) splits in the COCO and VOC2012 layouts."""
    from edge_cbn.lab.scenes.synthetic_datasets import write_datasets

    start = time.time()
    write_datasets(out, seed=seed, val=count, train=calibration_count, hw=(size, size), backgrounds=backgrounds)
    click.echo(f"wrote {count} val and {calibration_count} train scenes on {backgrounds} backgrounds to {out} "
               f"in {time.time() - start:.0f} s")


@cli.command("train")
@click.argument("name", type=click.Choice(["yolo_shapes", "fcn_shapes"]))
@click.option("--steps", default=1500, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--scenes", "scene_count", default=10000, show_default=True, help="Training scenes drawn once, then augmented.")
@click.option("--lr", default=2e-3, show_default=True, help="Peak learning rate (AdamW, cosine).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Weights file (default: the package's).")
@click.option("--data", type=click.Path(file_okay=False, exists=True), help="make-data folder to check on.")
def train_command(name, steps, batch_size, scene_count, lr, seed, out, data):
    """Train NAME from scratch, save its weights and their model card, check it on --data."""
    from edge_cbn.convert import models
    from edge_cbn.convert.weights.cards import code_commit, write_card
    from edge_cbn.convert.weights.npz import SHIPPED_DIR, save_npz

    commit = code_commit(Path(__file__).resolve().parents[1])  # the code as it trains, not as it is later
    start = time.time()
    model = train(name, steps=steps, batch_size=batch_size, scene_count=scene_count, seed=seed, lr=lr)
    path = save_npz(model, out or SHIPPED_DIR / models.get_spec(name).weights_file)
    minutes = (time.time() - start) / 60
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) after {minutes:.1f} min", err=True)
    metrics = check(name, Path(data), path) if data else {}
    options = {"steps": steps, "batch_size": batch_size, "scenes": scene_count, "lr": lr, "seed": seed}
    card = write_card(path, model=name, training={
        "command": f"python tools/train_synthetic.py train {name} " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in options.items()),
        "options": options, "seed": seed, "commit": commit, "minutes": round(minutes, 1)},
        data={"training": f"{scene_count} scenes of the seeded 'fit' stream (seed {seed}), flips and quarter turns; "
                          "never the val or train splits of make-data",
              "clean_metrics_on": f"the val split of {data}" if data else None},
        clean_metrics={**metrics, "command": f"python tools/train_synthetic.py check {name} --data {data}"}
        if data else {})
    click.echo(f"wrote {card}", err=True)
    if data:
        click.echo(json.dumps({"model": name, "train_minutes": round(minutes, 1), **metrics}))


@cli.command("check")
@click.argument("name", type=click.Choice(["yolo_shapes", "fcn_shapes"]))
@click.option("--data", required=True, type=click.Path(file_okay=False, exists=True), help="make-data folder.")
@click.option("--weights", type=click.Path(dir_okay=False, exists=True), help="Default: the shipped weights.")
def check_command(name, data, weights):
    """Clean metric of NAME exported to TFLite, on the val split of --data."""
    click.echo(json.dumps({"model": name, **check(name, Path(data), weights)}))


if __name__ == "__main__":
    cli()
