"""Natural photos that install offline (scikit-image's and scikit-learn's sample images) and seeded
crops of them: the evaluation and calibration data of this project, since no dataset can be downloaded.

Needs the `data` extra (`pip install edge-cbn[data]`)."""
from __future__ import annotations

import cv2
import numpy as np

# Colour photographs first, then greyscale ones (replicated to RGB).
SKIMAGE_COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina")
SKLEARN_COLOUR = ("china.jpg", "flower.jpg")
SKIMAGE_GREY = ("camera", "clock", "coins", "grass", "gravel", "brick", "moon", "page", "text")
# The colour photographs of everyday scenes and objects, the kind ImageNet classifiers are made for; the
# others are greyscale, textures, text, microscopy and astronomy.
NATURAL = ("astronaut", "chelsea", "china", "coffee", "flower", "motorcycle", "rocket")
PHOTO_SETS = ("all", "natural")


def load_photos(which: str = "all") -> dict[str, np.ndarray]:
    """name -> RGB uint8 image, for the photo set `which` (PHOTO_SETS)."""
    if which not in PHOTO_SETS:
        raise ValueError(f"unknown photo set {which!r}; expected one of {PHOTO_SETS}")
    import skimage.data  # lazy: scikit-image (the [data] extra), only when the photos are loaded
    from sklearn.datasets import load_sample_image  # lazy: scikit-learn (the [data] extra), likewise

    photos = {n: getattr(skimage.data, n)() for n in SKIMAGE_COLOUR}
    photos["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    photos.update({n.split(".")[0]: load_sample_image(n) for n in SKLEARN_COLOUR})
    for n in SKIMAGE_GREY:
        grey = getattr(skimage.data, n)()
        photos[n] = np.repeat(grey[..., None], 3, axis=2)
    return photos if which == "all" else {n: photos[n] for n in NATURAL}


def random_crops(photos: dict[str, np.ndarray], n: int, size: int, seed: int,
                 scale=(0.15, 1.0)) -> tuple[np.ndarray, list[str]]:
    """`n` square crops (side a random fraction `scale` of the shorter photo side, random position, random
    horizontal flip) resized to size×size RGB uint8, cycling through the photos; returns (crops, names)."""
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    out = np.empty((n, size, size, 3), np.uint8)
    used = []
    for i in range(n):
        name = names[i % len(names)]
        img = photos[name]
        h, w = img.shape[:2]
        side = int(min(h, w) * np.sqrt(rng.uniform(scale[0] ** 2, scale[1] ** 2)))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = img[y:y + side, x:x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)
        used.append(name)
    return out, used


def split_photos(photos: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Disjoint calibration / evaluation photo sets (alternating by sorted name)."""
    names = sorted(photos)
    return ({n: photos[n] for n in names[0::2]}, {n: photos[n] for n in names[1::2]})
