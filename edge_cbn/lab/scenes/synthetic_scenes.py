"""Seeded synthetic scenes: shapes of five classes (`SHAPE_CLASSES`) pasted on random crops of the bundled
natural photos, for training the shipped `yolo_shapes` / `fcn_shapes` models (`tools/train_synthetic.py`)
and for their COCO and VOC evaluation sets (`synthetic_datasets.py`): one copy of the scene logic.

A scene is a function of (seed, split, index, backgrounds) alone, so any subset can be regenerated and a set
of N scenes is a prefix of a set of N + 1.  Each scene has 0-6 shapes with a scale spread of about 8:1 (side
8-45 % of the image), aspect jitter and any rotation, filled with a solid colour, a gradient, stripes or a
tinted photo texture, drawn anti-aliased; later shapes occlude earlier ones, but every shape keeps at least
half of its pixels visible.  Labels are the *visible* pixels (alpha >= 0.5): boxes enclose them, masks are them.

`backgrounds="procedural"` (`BACKGROUNDS`) paints the same shapes, by the same logic, on out-of-distribution
scenes: seeded procedural textures (fractal value noise, sinusoid plaids, Voronoi cells, random-walk blobs,
colour gradients, some blended in pairs) that no training scene used; the shapes' texture fill is procedural
too, so no pixel comes from a photo.  Its scenes are a stream of their own: photo scenes keep their seeds.

The photo backgrounds need the `data` extra (the photos); both need OpenCV; no TensorFlow.
"""
from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

from ...convert.models.shape_classes import SHAPE_CLASSES
from .photos import load_photos
from .procedural import procedural_background

SPLITS = {"val": 0, "train": 1, "fit": 2}  # evaluation, calibration, model training: disjoint scene streams
SIZE_RANGE = (0.08, 0.45)  # shape side as a fraction of the image's shorter side, log-uniform
SHAPE_COUNT_P = (0.04, 0.16, 0.2, 0.2, 0.16, 0.14, 0.1)  # P(0 shapes), P(1), ... P(6)
MIN_VISIBLE = 0.5  # fraction of a shape's pixels that occlusion must leave visible
MIN_CONTRAST = 40.0  # RGB distance between a fill's and its background's mean colours worth retrying for
VOID = 255  # the VOC label of the border band


@dataclasses.dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) RGB uint8
    class_ids: list  # per shape, index into SHAPE_CLASSES
    masks: list  # per shape, (H, W) bool of its visible pixels

    def boxes(self) -> np.ndarray:
        """(N, 4) float32 x, y, w, h boxes enclosing each shape's visible pixels (COCO's convention)."""
        out = np.zeros((len(self.masks), 4), np.float32)
        for i, mask in enumerate(self.masks):
            ys, xs = np.nonzero(mask)
            out[i] = xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
        return out

    def label_map(self, void_border: bool = True) -> np.ndarray:
        """(H, W) uint8 VOC labels: 0 background, 1 + class id on a shape, and with `void_border` 255 on the
        2-pixel band where labels change (anti-aliased pixels belong to neither side), as VOC marks them."""
        labels = np.zeros(self.image.shape[:2], np.uint8)
        for class_id, mask in zip(self.class_ids, self.masks):
            labels[mask] = class_id + 1
        if void_border:
            kernel = np.ones((3, 3), np.uint8)
            labels[cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)] = VOID
        return labels


def _star(points=5, inner=0.45):
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2, inner, 1.1)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _cross(arm=0.33):
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                     (-1, -a), (-a, -a)], np.float64)


# Unit outlines (radius about 1, y down), in SHAPE_CLASSES order.
_t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
OUTLINES = {
    "circle": np.stack([np.cos(_t), np.sin(_t)], 1),
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], np.float64) * 0.85,
    "triangle": 1.15 * np.stack([np.cos(-np.pi / 2 + np.arange(3) * 2 * np.pi / 3),
                                 np.sin(-np.pi / 2 + np.arange(3) * 2 * np.pi / 3)], 1),
    "star": _star(),
    "cross": _cross(),
}
assert tuple(OUTLINES) == SHAPE_CLASSES


MAX_PHOTO_SIDE = 640  # photos are shrunk to this shorter side once: crops then resize several times faster


@functools.lru_cache(maxsize=1)
def photo_list() -> tuple:
    """The bundled photos (all 19, colour and grey) as RGB uint8 arrays, loaded once."""
    photos = []
    for _, photo in sorted(load_photos("all").items()):
        scale = MAX_PHOTO_SIDE / min(photo.shape[:2])
        if scale < 1:
            photo = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        photos.append(photo)
    return tuple(photos)


def background(rng, hw) -> np.ndarray:
    """A random crop (25-100 % of the shorter side, random flip) of a random photo resized to `hw`, with
    brightness and contrast jitter; float32 RGB."""
    photos = photo_list()
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.25, 1.0))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = cv2.resize(photo[y:y + side, x:x + side], (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop.astype(np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-25, 25)


def shape_alpha(rng, class_id: int, hw) -> np.ndarray:
    """(H, W) uint8 anti-aliased coverage (255 = covered) of one shape of class `class_id`: random size (log-uniform in
    SIZE_RANGE), aspect 3:4 to 4:3, rotation and centre (up to a fifth of it may leave the image)."""
    h, w = hw
    side = min(h, w) * np.exp(rng.uniform(*np.log(SIZE_RANGE)))
    aspect = np.exp(rng.uniform(np.log(0.75), np.log(4 / 3)))
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = OUTLINES[SHAPE_CLASSES[class_id]] * (side / 2) * [np.sqrt(aspect), 1 / np.sqrt(aspect)]
    margin = 0.3 * side
    centre = [rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)]
    pts = pts @ rot.T + centre
    alpha = np.zeros((h, w), np.uint8)
    cv2.fillPoly(alpha, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)  # 1/16-px vertices
    return alpha


def _colour(rng):
    return rng.uniform(0, 255, 3).astype(np.float32)


def fill(rng, hw, backdrop=background) -> np.ndarray:
    """(H, W, 3) float32 paint for a shape: a solid colour with grain, a linear gradient, stripes, or another
    background from `backdrop` (a crop of another photo by default) tinted with a colour."""
    h, w = hw
    kind = rng.choice(("solid", "gradient", "stripes", "texture"), p=(0.45, 0.2, 0.15, 0.2))
    if kind == "texture":
        return backdrop(rng, hw) * (_colour(rng) / 255 * 0.8 + 0.4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    a, b = _colour(rng), _colour(rng)
    if kind == "solid":
        return a + rng.standard_normal((h, w, 3), np.float32) * rng.uniform(0, 8)
    if kind == "gradient":
        t = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
        return a * (1 - t) + b * t
    period = rng.uniform(4, 14)
    return np.where(np.sin(along * 2 * np.pi / period) > 0, a, b)


def contrasting_fill(rng, image, alpha, backdrop=background, tries: int = 4) -> np.ndarray:
    """The first of up to `tries` fills whose mean colour under the shape differs from the image's by
    MIN_CONTRAST, else the most different one: a shape the eye can find."""
    weight = alpha[..., None] / max(float(alpha.sum()), 1.0)
    under = (image * weight).sum((0, 1))
    best, best_distance = None, -1.0
    for _ in range(tries):
        candidate = fill(rng, alpha.shape, backdrop)
        distance = float(np.linalg.norm((candidate * weight).sum((0, 1)) - under))
        if distance > best_distance:
            best, best_distance = candidate, distance
        if distance >= MIN_CONTRAST:
            break
    return best


def place(rng, class_id, hw, owner, areas, tries: int = 8):
    """The alpha of a new shape that leaves every earlier shape (`owner`: index of the shape owning each
    pixel, -1 none; `areas`: their full pixel counts) at least MIN_VISIBLE visible; None after `tries`."""
    for _ in range(tries):
        alpha = shape_alpha(rng, class_id, hw)
        covered = owner[alpha >= 128]
        if covered.size < 30:  # almost all outside the image
            continue
        left = np.array(areas) - np.bincount(covered[covered >= 0], minlength=len(areas))
        if not areas or (left >= MIN_VISIBLE * np.array(areas)).all():
            return alpha
    return None


def finish(rng, image) -> np.ndarray:
    """Camera-like degradations (sensor noise, slight blur), then uint8."""
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.0))
    image = image + rng.standard_normal(image.shape, np.float32) * rng.uniform(0, 6)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def paint(rng, image, alpha, backdrop=background) -> None:
    """Composite a fill (texture fills from `backdrop`) into `image` (float32 RGB, in place) through the uint8
    coverage `alpha`, over the shape's bounding rectangle only."""
    x, y, w, h = cv2.boundingRect(alpha)
    region = (slice(y, y + h), slice(x, x + w))
    a = alpha[region][..., None].astype(np.float32) / 255
    under = image[region]
    under[:] = under * (1 - a) + contrasting_fill(rng, under, a[..., 0], backdrop) * a


def make_scene(rng, hw=(160, 160), backdrop=background) -> Scene:
    """One scene of size `hw` (height, width) drawn from the generator `rng`, on a `backdrop(rng, hw)`
    background (a `BACKGROUNDS` value)."""
    image = backdrop(rng, hw)
    owner = np.full(hw, -1, np.int32)
    class_ids, areas = [], []
    for _ in range(rng.choice(len(SHAPE_COUNT_P), p=SHAPE_COUNT_P)):
        class_id = int(rng.integers(len(SHAPE_CLASSES)))
        alpha = place(rng, class_id, hw, owner, areas)
        if alpha is None:
            continue
        paint(rng, image, alpha, backdrop)
        covered = alpha >= 128
        owner[covered] = len(class_ids)
        class_ids.append(class_id)
        areas.append(int(covered.sum()))
    masks = [owner == i for i in range(len(class_ids))]
    return Scene(finish(rng, image), class_ids, masks)


BACKGROUNDS = {"photos": background, "procedural": procedural_background}  # `backgrounds` name -> backdrop


def check_backgrounds(backgrounds: str) -> None:
    if backgrounds not in BACKGROUNDS:
        raise ValueError(f"unknown backgrounds {backgrounds!r}; expected one of {tuple(BACKGROUNDS)}")


def scene_rng(seed: int, split: str, index: int, backgrounds: str = "photos"):
    """The generator of one scene.  Procedural scenes draw from streams of their own; photo scenes keep the
    seeds they always had (the same bytes as before the option)."""
    check_backgrounds(backgrounds)
    stream = [] if backgrounds == "photos" else [list(BACKGROUNDS).index(backgrounds)]
    return np.random.default_rng([seed, SPLITS[split], index, *stream])


def scene(seed: int, split: str, index: int, hw=(160, 160), backgrounds: str = "photos") -> Scene:
    """Scene `index` of `split` (SPLITS) for `seed` on `backgrounds` (BACKGROUNDS): the same arguments always
    give the same scene."""
    return make_scene(scene_rng(seed, split, index, backgrounds), hw, BACKGROUNDS[backgrounds])


def scenes(seed: int, split: str, count: int, hw=(160, 160), start: int = 0, backgrounds: str = "photos"):
    """Scenes `start` .. `start + count - 1` of `split`, one at a time."""
    for i in range(start, start + count):
        yield scene(seed, split, i, hw, backgrounds)
