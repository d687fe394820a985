"""Every model family exported to TFLite (BN folded) gives the Keras outputs at a small input size."""
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from edge_cbn.convert import models as zoo  # noqa: E402
from edge_cbn.convert.models import yolov3  # noqa: E402
from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.runtime.noisy_model import NoisyModel  # noqa: E402
from edge_cbn.convert.export import export  # noqa: E402
from edge_cbn.runtime.processing import model_input, normalise  # noqa: E402
from edge_cbn.convert.weights.assign import assign_state_dict, random_state_dict  # noqa: E402

FAMILIES = [("resnet18", 64), ("mobilenet_v2", 64), ("efficientnet_lite0", 64), ("yolov3", 64),
            ("fcn_resnet50", 48)]


@pytest.mark.parametrize("name,side", FAMILIES)
def test_tflite_equals_keras(tmp_path, name, side):
    spec = zoo.get_spec(name)
    model = zoo.build(name, input_size=side, num_classes=spec.num_classes if spec.task != "classification" else 10)
    assign_state_dict(model, random_state_dict(model, seed=2))
    head = yolov3.HEAD if spec.task == "detection" else None  # a detector's bundle must say how to decode it
    path = export(model, tmp_path / f"{name}.tflite", name=name, task=spec.task, preprocess=spec.preprocess,
                  labels=[], calibration=False, head=head)
    bundle = load_bundle(path)
    assert len(bundle.layers) == sum(1 for l in model.layers if type(l).__name__ in
                                     ("Conv2D", "DepthwiseConv2D", "Dense"))
    rgb = np.random.default_rng(3).integers(0, 256, (1, side, side, 3), np.uint8)
    # RGB uint8 in, normalised in the graph — except for letterboxing models (YOLOv3), which stay float.
    assert bundle.raw_input == (not spec.preprocess["letterbox"])
    want = model(normalise(rgb, spec.preprocess), training=False)
    want = [np.asarray(w) for w in (want if isinstance(want, (list, tuple)) else [want])]
    got = NoisyModel(bundle).run(model_input(rgb, bundle), 0)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1e-4 * max(1.0, np.abs(w).max()), (name, np.abs(g - w).max())
