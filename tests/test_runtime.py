"""Device runtime: preprocessing, invoke, postprocessing per task, refolded statistics."""
import cv2
import numpy as np
import pytest

from edge_cbn.runtime.bundle import Bundle, load_bundle
from edge_cbn.runtime.processing import normalise, top_k
from predict import Predictor

HEAD = {"anchors": [[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [59, 119], [116, 90], [156, 198],
                    [373, 326]], "masks": [[6, 7, 8], [3, 4, 5], [0, 1, 2]], "strides": [32, 16, 8]}


class FakeInterpreter:
    """Returns fixed outputs: enough of the LiteRT interface for the Predictor."""

    def __init__(self, input_hw, outputs):
        self.input_hw, self.outputs, self.x = input_hw, outputs, None

    def get_input_details(self):
        return [{"index": 0, "shape": np.array([1, *self.input_hw, 3])}]

    def get_output_details(self):
        return [{"index": i + 1, "shape": np.array(o.shape)} for i, o in enumerate(self.outputs)]

    def set_tensor(self, index, x):
        self.x = x

    def invoke(self):
        pass

    def get_tensor(self, index):
        return self.outputs[index - 1]


class FloatBundle(Bundle):
    """A bundle whose model takes float input normalised in Python (no flatbuffer to read it from)."""
    raw_input = False


def fake_runner(task, input_hw, outputs, *, labels=(), head=None, letterbox=False, **kw):
    meta = {"format": 1, "model": "fake", "task": task, "input_size": list(input_hw), "labels": list(labels),
            "preprocess": {"mean": [0.0] * 3, "std": [255.0] * 3, "letterbox": letterbox}, "head": head}
    return Predictor(FloatBundle(None, b"", meta, []), interpreter=FakeInterpreter(input_hw, outputs), **kw)


def test_top_k_known_logits():
    logits = np.array([[0.0, 3.0, 1.0, 2.0]], np.float32)
    got = top_k(logits, ["a", "b", "c"], k=3)
    assert [(i, name) for i, name, _ in got] == [(1, "b"), (3, "3"), (2, "c")]
    p = np.exp([0.0, 3.0, 1.0, 2.0]) / np.exp([0.0, 3.0, 1.0, 2.0]).sum()
    np.testing.assert_allclose([s for *_, s in got], p[[1, 3, 2]], rtol=1e-6)
    probs = np.array([0.1, 0.7, 0.2])  # already a distribution: no second softmax
    assert top_k(probs, [], k=1) == [(1, "1", pytest.approx(0.7))]
    small = np.array([0.2, 0.5, 0.1], np.float32)  # below 1 but no distribution: softmax
    assert top_k(small, [], k=1)[0][2] == pytest.approx(np.exp(0.5) / np.exp(small.astype(float)).sum())
    quantised = np.array([[3, 200, 7]], np.uint8)  # integer outputs, k beyond the class count
    assert [i for i, *_ in top_k(quantised, [], k=5)] == [1, 2, 0]
    ties = np.array([1.0, 4.0, 4.0, 2.0], np.float32)
    assert [i for i, *_ in top_k(ties, [], k=3)] == [1, 2, 3]
    assert top_k(logits, ["a"], k=0) == []
    np.testing.assert_array_equal(logits, [[0.0, 3.0, 1.0, 2.0]])  # the caller's array is left alone


def test_classification_postprocess_max_results():
    runner = fake_runner("classification", (8, 8), [np.array([[5.0, 1.0, 9.0]], np.float32)],
                         labels=["x", "y", "z"], max_results=2)
    res = runner(np.zeros((20, 30, 3), np.uint8))
    assert [r[:2] for r in res] == [(2, "z"), (0, "x")]
    assert len(runner(np.zeros((20, 30, 3), np.uint8), max_results=1)) == 1
    assert runner.interpreter.x.shape == (1, 8, 8, 3)


def test_float_input_preprocessing_equals_offline_normalisation():
    runner = fake_runner("classification", (16, 16), [np.zeros((1, 3), np.float32)])
    runner.meta["preprocess"].update(mean=[120.0, 110.0, 100.0], std=[60.0, 58.0, 57.0])
    runner = Predictor(runner.bundle, interpreter=runner.interpreter)  # the table is made from the meta
    frame = np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)
    x, _ = runner.preprocess(frame)
    rgb = cv2.resize(frame, (16, 16), interpolation=cv2.INTER_LINEAR)[..., ::-1]
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[0], (rgb - np.float32([120, 110, 100])) / np.float32([60, 58, 57]), rtol=1e-6)
    # The per-frame table lookup equals the offline arithmetic exactly.
    np.testing.assert_array_equal(x[0], normalise(rgb, runner.meta["preprocess"]))


def test_segmentation_mask_at_frame_size():
    logits = np.zeros((1, 4, 4, 3), np.float32)
    logits[0, :2, :, 1] = 5  # top half class 1
    logits[0, 2:, 2:, 2] = 5  # bottom-right class 2
    mask = fake_runner("segmentation", (4, 4), [logits])(np.zeros((40, 60, 3), np.uint8))
    assert mask.shape == (40, 60)
    assert (mask[:20] == 1).all() and (mask[20:, 30:] == 2).all() and (mask[20:, :30] == 0).all()


def test_detection_decodes_sorts_heads_and_unletterboxes():
    maps = {s: np.full((1, 64 // s, 64 // s, 3 * 7), -10.0, np.float32) for s in (32, 16, 8)}
    cell = maps[16][0, 1, 2].reshape(3, 7)
    cell[0, :4] = 0.0  # centre of cell (x=2, y=1) at stride 16, anchor 3 (30x61)
    cell[0, 4], cell[0, 6] = 10.0, 10.0  # objectness, class 1
    runner = fake_runner("detection", (64, 64), [maps[8], maps[32], maps[16]], labels=["a", "b"],
                         head=HEAD, letterbox=True)
    frame = np.zeros((100, 200, 3), np.uint8)
    x, ctx = runner.preprocess(frame)
    assert x.shape == (1, 64, 64, 3) and ctx["scale"] == pytest.approx(0.32) and tuple(ctx["pad"]) == (0, 16)
    (cls, label, score, box), = runner.postprocess(runner.invoke(x), ctx)
    assert (cls, label) == (1, "b") and score > 0.99
    cx, cy, w, h = 40 / 0.32, (24 - 16) / 0.32, 30 / 0.32, 61 / 0.32
    np.testing.assert_allclose(box, np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, [200, 100] * 2),
                               atol=1e-3)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    pytest.importorskip("tensorflow")
    from tiny import PRE, tiny_model

    from edge_cbn.convert.export import export

    model = tiny_model(num_classes=4)
    path = export(model, tmp_path_factory.mktemp("rt") / "cls.tflite", name="cls", task="classification",
                  preprocess=PRE, labels=["w", "x", "y", "z"])
    return model, load_bundle(path)


def test_processor_and_noisy_model_end_to_end(tiny_bundle):
    from tiny import PRE, new_stats

    from edge_cbn.runtime.noisy_model import NoisyModel

    model, bundle = tiny_bundle
    frame = np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)
    runner = Predictor(bundle, num_threads=1)
    x, _ = runner.preprocess(frame)
    # The exported model takes the resized RGB pixels as they are and normalises them in the graph.
    assert bundle.raw_input and x.dtype == np.uint8
    np.testing.assert_array_equal(x[0], cv2.resize(frame, (16, 16), interpolation=cv2.INTER_LINEAR)[..., ::-1])
    logits = runner.invoke(x)[0]
    np.testing.assert_allclose(logits, np.asarray(model(normalise(x, PRE), training=False)), atol=1e-4)
    res = runner(frame, max_results=4)
    assert [r[0] for r in res] == list(np.argsort(-logits[0])) and res[0][1] == "wxyz"[res[0][0]]

    served = NoisyModel(bundle, num_threads=1)
    np.testing.assert_array_equal(served.run(x)[0], logits)
    served.set_stats(new_stats(bundle, seed=4))
    assert not np.allclose(served.run(x)[0], logits)


@pytest.mark.parametrize("states", [0, 1, 3])
def test_refold_with_non_finite_outputs_is_rolled_back(tiny_bundle, states):
    """A refold whose model gives NaN on the probe frame never serves: the previous statistics stay."""
    from tiny import new_stats

    from edge_cbn.runtime.noise import make_noise
    from edge_cbn.runtime.noisy_model import NoisyModel, noise_targets

    _, bundle = tiny_bundle
    chip = make_noise("relative", 0.05, 1).instantiate(noise_targets(bundle))
    x = np.random.default_rng(1).integers(0, 256, (1, 16, 16, 3), np.uint8)
    served = NoisyModel(bundle, chip, num_threads=1, noise_states=states)
    good = new_stats(bundle, seed=5)
    assert served.set_stats(good, probe=x)
    before = served.run(x, frame=3)[0]
    bad = {bn: (mean, np.full_like(var, np.nan)) for bn, (mean, var) in good.items()}
    assert served.set_stats(bad, probe=x) is False
    assert all(np.array_equal(served.stats()[bn][1], good[bn][1]) for bn in good)
    np.testing.assert_array_equal(served.run(x, frame=3)[0], before)
    assert np.isfinite(before).all()


def _moments_vector(rng, channels: int) -> np.ndarray:
    """A plausible calibration-variant moments output: per-channel means of y, then means of y² (>= mean²)."""
    m = rng.normal(0, 0.5, channels)
    return np.concatenate([m, m * m + rng.uniform(0.5, 1.0, channels)]).astype(np.float32)


def test_calibrator_drops_non_finite_moments_and_never_hands_them_out(tiny_bundle):
    from edge_cbn.runtime.stream_calibrator import StreamCalibrator
    from edge_cbn.runtime.validation import Invalid

    _, bundle = tiny_bundle
    cal = StreamCalibrator(bundle, mode="shift", refold_every=1, stages=1)
    channels = [len(bundle.layer(bn).mean) for bn in cal.bns]
    rng = np.random.default_rng(0)
    noisy = _moments_vector(rng, sum(channels))
    noisy[0] = np.nan  # the first BN's first channel: that layer is left out of this frame, the others are not
    stats = cal.observe(noisy, cal.statistics(), _moments_vector(rng, sum(channels)), cal.statistics())
    first, rest = cal.bns[0], cal.bns[1:]
    assert cal.dropped_frames == 1 and cal.noisy[first].count == cal.clean[first].count == 0
    assert all(cal.noisy[bn].count == cal.clean[bn].count == 1 for bn in rest)
    assert all(np.isfinite(m).all() and np.isfinite(v).all() and (v >= 0).all() for m, v in stats.values())
    np.testing.assert_array_equal(stats[first][1], bundle.layer(first).var)  # no moments yet: the source's

    all_inf = np.full(2 * sum(channels), np.inf, np.float32)  # nothing usable: not even counted as a frame
    assert cal.observe(all_inf, cal.statistics(), _moments_vector(rng, sum(channels)), cal.statistics()) is None
    assert cal.dropped_frames == 2 and cal.noisy[rest[0]].count == 1

    cal.estimate = lambda bn: (np.full(len(cal.source[bn][0]), np.nan, np.float32), cal.source[bn][1])
    before = cal.statistics()
    cal.observe(_moments_vector(rng, sum(channels)), before, _moments_vector(rng, sum(channels)), before)
    assert cal.rejected_estimates == len(cal.bns)  # every estimate refused: the previous statistics stay
    assert all(np.array_equal(cal.statistics()[bn][0], before[bn][0]) for bn in cal.bns)

    state = cal.state_dict()
    again = StreamCalibrator(bundle, mode="shift", refold_every=1, stages=1)
    again.load_state_dict(state)
    assert (again.dropped_frames, again.rejected_estimates) == (2, len(cal.bns))
    for key, bad in ((f"applied/{first}/var", -np.ones(channels[0])), (f"noisy/{rest[0]}/mean", np.full(3, 0.5)),
                     (f"clean/{rest[0]}/c", np.full(channels[1], np.nan))):
        fresh = StreamCalibrator(bundle, mode="shift", refold_every=1, stages=1)
        with pytest.raises(Invalid):
            fresh.load_state_dict({**state, key: bad})
        assert fresh.stage == 0 and fresh.noisy[rest[0]].count == 0  # all or nothing: left as it was
    older = {k: v for k, v in state.items() if k not in ("dropped_frames", "rejected_estimates")}
    again.load_state_dict(older)  # a state saved before the counters existed
    assert again.dropped_frames == 0


def test_nms_looks_at_the_best_candidates_only():
    from edge_cbn.runtime.detection import nms

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, (5000, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + 4], axis=1)  # small, mostly disjoint boxes: little is suppressed
    scores = rng.random(5000)
    keep = nms(boxes, scores, np.zeros(5000, int), max_candidates=200)
    assert len(keep) <= 200 and set(keep) <= set(np.argsort(-scores)[:200])
    assert list(keep[:3]) == list(np.argsort(-scores)[:3])
