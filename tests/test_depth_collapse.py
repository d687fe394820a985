"""tools/depth_collapse.py's own arithmetic: the depth a model's name carries, read from its graph, and the
head scale that makes a chosen share of crops confident (the runs themselves take tens of minutes)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")
TOOL = Path(__file__).resolve().parent.parent / "tools" / "depth_collapse.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("depth_collapse", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_longest_weight_path_is_the_depth_in_a_resnets_name(tool):
    from edge_cbn.convert import models as zoo

    counts = tool.layer_counts(zoo.build("resnet18", input_size=64, num_classes=10))
    assert counts["path"] == 18  # 17 convs on the longest path (not the shortcuts' 1x1) and the classifier
    assert counts["convs"] == counts["bns"] == 20


def test_head_scale_makes_the_chosen_share_confident(tool):
    logits = np.random.default_rng(0).normal(0, 1, (400, 50))
    for share in (0.1, 0.25, 0.6):
        k = tool.head_scale(logits, share)
        assert np.mean(tool.softmax_max(k * logits) >= 0.5) == pytest.approx(share, abs=0.01)
