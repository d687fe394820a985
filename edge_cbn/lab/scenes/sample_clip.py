"""Make the bundled sample clip (``edge_cbn.stream.sample`` reads it): slow Ken Burns pans and zooms over
natural photos, like a camera would see.

Regenerate it (needs the ``data`` extra: scikit-image and scikit-learn, which ship the photos) with::

    python -m edge_cbn.lab.scenes.sample_clip [--out edge_cbn/stream/static/sample.mp4]

``--held-out SEED`` writes another clip of the same photos, in a seeded order with seeded moves: frames the
bundled clip never shows, for checking what was tuned on it (``edge-cbn bench converge --video``).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Dict, Optional, Sequence

import cv2
import numpy as np

from ...stream.sample import STATIC
from .photos import load_photos as all_photos
SIZE = (320, 240)  # width, height
FPS = 10
SECONDS_PER_PHOTO = 2.0

# name, where the photo comes from (written to the JSON), subject, and the Ken Burns move: start and end
# (centre x, centre y, zoom) with the centre as a fraction of the photo and zoom the crop's size as a
# fraction of the largest 4:3 crop the photo holds.
PHOTOS = [
    ("chelsea", "skimage.data.chelsea()", "cat", (0.50, 0.50, 1.00), (0.42, 0.42, 0.75)),
    ("coffee", "skimage.data.coffee()", "coffee cup", (0.35, 0.50, 0.85), (0.60, 0.50, 0.85)),
    ("astronaut", "skimage.data.astronaut()", "person", (0.50, 0.45, 1.00), (0.45, 0.35, 0.70)),
    ("rocket", "skimage.data.rocket()", "rocket on a launch pad", (0.50, 0.45, 0.70), (0.50, 0.50, 1.00)),
    ("motorcycle", "skimage.data.stereo_motorcycle()[0]", "motorcycle", (0.62, 0.50, 0.85),
     (0.38, 0.52, 0.85)),
    ("china", "sklearn.datasets.load_sample_image('china.jpg')", "temple building", (0.50, 0.50, 1.00),
     (0.55, 0.45, 0.78)),
    ("flower", "sklearn.datasets.load_sample_image('flower.jpg')", "flower", (0.40, 0.55, 0.80),
     (0.55, 0.45, 0.80)),
]

# Who took each photo and under which terms (from the shipping package's docs; written to the JSON).
CREDITS = {
    "chelsea": "Stefan van der Walt, CC0 (scikit-image)",
    "coffee": "Rachel Michetti, CC0 (scikit-image)",
    "astronaut": "NASA (Eileen Collins), public domain (scikit-image)",
    "rocket": "SpaceX (DSCOVR launch on Falcon 9), public domain (scikit-image)",
    "motorcycle": "Middlebury 2014 stereo dataset, Scharstein et al., GCPR 2014 (scikit-image)",
    "china": "danielbuechele on Flickr (photos/danielbuechele/6061409035), CC BY 2.0 "
             "(https://creativecommons.org/licenses/by/2.0/), shipped by scikit-learn",
    "flower": "Flickr photos/vultilion/6056698931 (scikit-learn's README names danielbuechele), CC BY 2.0 "
              "(https://creativecommons.org/licenses/by/2.0/), shipped by scikit-learn",
}


def load_photos() -> Dict[str, np.ndarray]:
    """The clip's source photos as RGB uint8 arrays by name (needs the `data` extra)."""
    photos = all_photos()
    return {name: photos[name] for name, *_ in PHOTOS}


def _smoothstep(t: float) -> float:
    return t * t * (3 - 2 * t)


def _crop_box(photo_wh, move, t: float, aspect: float):
    """The ``(x0, y0, x1, y1)`` crop (photo pixels) at time ``t`` in 0..1 of the move."""
    w, h = photo_wh
    full_w = min(w, h * aspect)
    (cx0, cy0, z0), (cx1, cy1, z1) = move
    s = _smoothstep(t)
    zoom = z0 + (z1 - z0) * s
    cw, ch = full_w * zoom, full_w * zoom / aspect
    cx = min(max((cx0 + (cx1 - cx0) * s) * w, cw / 2), w - cw / 2)
    cy = min(max((cy0 + (cy1 - cy0) * s) * h, ch / 2), h - ch / 2)
    return cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2


def _render(photo_bgr: np.ndarray, box, size) -> np.ndarray:
    """The crop ``box`` of the photo resampled to ``size`` (sub-pixel, so the motion is smooth)."""
    x0, y0, x1, y1 = box
    s = (x1 - x0) / size[0]
    m = np.array([[1 / s, 0, -x0 / s], [0, 1 / s, -y0 / s]])
    return cv2.warpAffine(photo_bgr, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def held_out_moves(seed: int) -> list:
    """`PHOTOS` in a seeded order, each with a seeded move (centre 0.3-0.7, zoom 0.55-1.0 at both ends)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(PHOTOS))
    return [(*PHOTOS[i][:3], *(tuple(np.round(rng.uniform([0.3, 0.3, 0.55], [0.7, 0.7, 1.0]), 3)) for _ in "se"))
            for i in order]


def make_sample(out: Path, fps: int = FPS, size=SIZE, seconds_per_photo: float = SECONDS_PER_PHOTO,
                photos: Optional[Dict[str, np.ndarray]] = None, held_out_seed: Optional[int] = None) -> dict:
    """Write the clip to ``out`` (mp4v) and its description to ``out.with_suffix('.json')``; checks that
    OpenCV reads every frame back. Returns the description.  `held_out_seed`: the photos in a seeded order
    with seeded moves (`held_out_moves`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    photos = photos or load_photos()
    per_photo = int(round(fps * seconds_per_photo))
    aspect = size[0] / size[1]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, tuple(size))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {out} with the mp4v codec")
    entries = []
    for name, loader, subject, start, end in PHOTOS if held_out_seed is None else held_out_moves(held_out_seed):
        credit = CREDITS[name]
        rgb = photos[name]
        h, w = rgb.shape[:2]
        boxes = [_crop_box((w, h), (start, end), i / (per_photo - 1), aspect) for i in range(per_photo)]
        # Pre-shrink (area filter) so the most zoomed-in crop is about 1:1: linear resampling won't alias.
        shrink = min(1.0, size[0] / min(b[2] - b[0] for b in boxes))
        bgr = cv2.resize(rgb[..., ::-1], None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        for box in boxes:
            writer.write(_render(bgr, [v * shrink for v in box], tuple(size)))
        first = len(entries) * per_photo
        entries.append({"name": name, "source": loader, "subject": subject, "credit": credit,
                        "photo_size": [w, h],
                        "first_frame": first, "last_frame": first + per_photo - 1,
                        "start_s": first / fps, "end_s": (first + per_photo) / fps,
                        "crops": [[round(v, 1) for v in b] for b in boxes]})
    writer.release()
    info = {"video": out.name, "fps": fps, "size": list(size), "frames": per_photo * len(PHOTOS),
            "codec": "mp4v", "crop_format": "x0, y0, x1, y1 in photo pixels, one per frame",
            "generator": "python -m edge_cbn.lab.scenes.sample_clip" + (
                f" --held-out {held_out_seed}" if held_out_seed is not None else ""), "photos": entries}
    _check_readback(out, info["frames"])
    text = json.dumps(info, indent=1)
    # Lists of numbers on one line each.
    text = re.sub(r"\[[-0-9.,\s]+\]", lambda m: " ".join(m.group(0).split()), text)
    out.with_suffix(".json").write_text(text + "\n")
    return info


def _check_readback(path: Path, expected: int) -> None:
    cap = cv2.VideoCapture(str(path))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    if count != expected:
        raise RuntimeError(f"{path}: OpenCV read back {count} frames, wrote {expected}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edge_cbn.lab.scenes.sample_clip", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=STATIC / "sample.mp4",
                        help="clip to write (default: %(default)s)")
    parser.add_argument("--fps", type=int, default=FPS)
    parser.add_argument("--seconds-per-photo", type=float, default=SECONDS_PER_PHOTO)
    parser.add_argument("--held-out", type=int, metavar="SEED", help="a held-out clip: seeded order and moves")
    args = parser.parse_args(argv)
    info = make_sample(args.out, fps=args.fps, seconds_per_photo=args.seconds_per_photo,
                       held_out_seed=args.held_out)
    size_kb = args.out.stat().st_size / 1024
    seconds = info["frames"] / info["fps"]
    print(f"wrote {args.out} ({info['frames']} frames, {seconds:.1f} s, {size_kb:.0f} KiB) "
          f"and {args.out.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
