"""The bundled sample clip: where it is, and what it shows.

``edge_cbn/stream/static/sample.mp4`` (package data, so it is there after a plain ``pip install``) is what
``open_source()`` streams when no camera, video or image folder is given. ``static/sample.json`` next to
it tells which photo each frame shows and the crop box of every frame in that photo's pixel coordinates,
for evaluations that compare a frame with its photo.  The generator is ``edge_cbn.lab.scenes.sample_clip``.
Standard library only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

STATIC = Path(__file__).with_name("static")


def sample_path() -> Path:
    """Path of the bundled clip ``edge_cbn/stream/static/sample.mp4``."""
    path = STATIC / "sample.mp4"
    if not path.is_file():
        raise FileNotFoundError(f"sample clip missing: {path} (regenerate with `python -m edge_cbn.lab.scenes.sample_clip`)")
    return path


def sample_info(path: Optional[Path] = None) -> dict:
    """The clip's JSON description (``sample.json`` next to the clip)."""
    return json.loads(Path(path or sample_path()).with_suffix(".json").read_text())


def photo_at(frame_index: int, info: Optional[dict] = None) -> dict:
    """The ``photos`` entry of ``sample.json`` whose frames include ``frame_index`` (0-based, in the file)."""
    info = info or sample_info()
    for photo in info["photos"]:
        if photo["first_frame"] <= frame_index <= photo["last_frame"]:
            return photo
    raise IndexError(f"frame {frame_index} is not in the sample clip ({info['frames']} frames)")
