"""Class names shipped with the package (ImageNet from torchvision's metadata, COCO's 80, VOC's 21)."""
from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).with_name("labels")


def load_labels(name: str) -> list[str]:
    path = _DIR / f"{name}.txt"
    if not path.exists():
        raise KeyError(f"no label set {name!r}; have {sorted(p.stem for p in _DIR.glob('*.txt'))}")
    return path.read_text().splitlines()
