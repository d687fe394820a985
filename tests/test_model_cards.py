"""Every weight file the package ships has a model card beside it whose sha256 is the file's, saying how it
was trained and what it measures clean (`convert/weights/cards.py`, written by tools/train_synthetic.py)."""
import json

import numpy as np
import pytest

from edge_cbn.convert.weights.cards import FIELDS, card_path, file_sha256, read_card, write_card
from edge_cbn.convert.weights.npz import SHIPPED_DIR


@pytest.mark.parametrize("weights", sorted(SHIPPED_DIR.glob("*.npz")), ids=lambda p: p.name)
def test_each_shipped_weight_file_has_a_card_that_matches_it(weights):
    card = read_card(weights)
    assert card["weights_file"] == weights.name and card["sha256"] == file_sha256(weights)
    assert card["model"] == weights.stem
    training = card["training"]
    assert training["seed"] == 0 and training["commit"] and "tools/train_synthetic.py train" in training["command"]
    metrics = {k: v for k, v in card["clean_metrics"].items() if k != "command"}
    assert metrics and all(0 < v <= 100 for v in metrics.values()) and "evaluate" in card["clean_metrics"]["command"]


def test_the_shipped_files_are_all_carded():
    assert {p.name for p in SHIPPED_DIR.glob("*.npz")} == {"yolo_shapes.npz", "fcn_shapes.npz"}


def test_a_written_card_reads_back_and_a_changed_file_no_longer_matches(tmp_path):
    weights = tmp_path / "m.npz"
    np.savez(weights, w=np.arange(4.0))
    path = write_card(weights, model="m", training={"command": "x", "seed": 1, "commit": "abc"}, data={},
                      clean_metrics={"miou": 50.0, "command": "y"})
    assert path == card_path(weights) == tmp_path / "m.card.json"
    card = read_card(weights)
    assert set(FIELDS) <= set(card) and card["sha256"] == file_sha256(weights)
    np.savez(weights, w=np.arange(5.0))
    assert read_card(weights)["sha256"] != file_sha256(weights)
    path.write_text(json.dumps({"model": "m"}))
    with pytest.raises(ValueError, match="lacks weights_file"):
        read_card(weights)
