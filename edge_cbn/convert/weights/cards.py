"""Model cards: where a weight file trained here comes from, beside it as `<weights>.card.json`.

A card holds the file's sha256 (checked by a test against the shipped file), how it was trained (the
command, its options and seed, the commit of the code), on what data (the seeded scene streams), and its
clean metrics with the command that measures them.  `tools/train_synthetic.py train` writes one with every
weight file it saves."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .checks import file_sha256

CARD_SUFFIX = ".card.json"
FIELDS = ("model", "weights_file", "sha256", "training", "data", "clean_metrics")


def card_path(weights) -> Path:
    """`X.npz` -> `X.card.json`."""
    weights = Path(weights)
    return weights.with_name(weights.stem + CARD_SUFFIX)


def code_commit(root) -> str:
    """The git commit of the checkout at `root` ("+dirty" when it has uncommitted changes), or
    "unknown" outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def write_card(weights, *, model: str, training: dict, data: dict, clean_metrics: dict) -> Path:
    """Write the card of the weight file `weights` (its sha256 computed here).

    Args:
        weights: the weight file.
        model: the registered model's name.
        training: how it was trained: {"command", "options", "seed", "commit", ...}.
        data: what it was trained and measured on.
        clean_metrics: {metric: value, "command": how to measure them}, or {} when not measured.

    Returns:
        The card's path.
    """
    card = {"model": model, "weights_file": Path(weights).name, "sha256": file_sha256(weights),
            "training": training, "data": data, "clean_metrics": clean_metrics}
    path = card_path(weights)
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def read_card(weights) -> dict:
    """The card of `weights`.

    Raises:
        OSError: no card beside the file.
        ValueError: a card that is not JSON or lacks a field of `FIELDS`.
    """
    card = json.loads(card_path(weights).read_text(encoding="utf-8"))
    missing = [k for k in FIELDS if k not in card]
    if missing:
        raise ValueError(f"{card_path(weights)}: the card lacks {', '.join(missing)}")
    return card
