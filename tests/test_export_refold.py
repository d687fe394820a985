"""Export (BN folding + TFLite conversion + sidecar) and on-device refold against full reconversion."""
import numpy as np
import pytest

keras = pytest.importorskip("keras")
from keras import layers  # noqa: E402

from edge_cbn.runtime import fold  # noqa: E402
from edge_cbn.runtime.bundle import load_bundle  # noqa: E402
from edge_cbn.convert.export import _fix_outputs, convert_keras, export, with_raw_input  # noqa: E402
from edge_cbn.convert.keras_fold import FoldError, fold_model, fold_plan  # noqa: E402
from edge_cbn.runtime.refold import Refolder  # noqa: E402
from edge_cbn.runtime.interpreter import io_indices, make_interpreter, run_interpreter
from edge_cbn.runtime.processing import normalise  # noqa: E402
from tiny import PRE, SIZE, new_stats, pixels, tiny_model  # noqa: E402


def run_tflite(model_bytes, x):
    it = make_interpreter(model_content=bytes(model_bytes))
    return run_interpreter(it, *io_indices(it), x)


def keras_outputs(model, x):
    out = model(normalise(x, PRE) if x.dtype == np.uint8 else x, training=False)
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


@pytest.fixture(scope="module")
def x():
    """Pixels: the exported model takes RGB uint8 and normalises in the graph."""
    return pixels(np.random.default_rng(5).standard_normal((1, SIZE, SIZE, 3)))


def reconvert(model):
    """The workstation path: full conversion of the folded model, behind the same uint8 input as export."""
    return convert_keras(with_raw_input(fold_model(model), PRE))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model(seg=True)
    path = export(model, tmp_path_factory.mktemp("exp") / "tiny.tflite", name="tiny", task="segmentation",
                  preprocess=PRE, labels=[f"c{i}" for i in range(5)], head={"k": np.arange(3)})
    return model, path


def set_weights(model, stats=None, kernels=None):
    """Put BN statistics / unfolded kernels into a Keras model (the reference for refold)."""
    for bn, (mean, var) in (stats or {}).items():
        model.get_layer(bn).moving_mean.assign(mean)
        model.get_layer(bn).moving_variance.assign(var)
    for name, kernel in (kernels or {}).items():
        model.get_layer(name).kernel.assign(kernel)
    return model


def test_fold_matches_bn_math():
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    gamma, beta, mean = (rng.normal(size=4).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.1, 2, 4).astype(np.float32)
    xs = rng.normal(size=(3, 6))
    ref = gamma * ((xs @ kernel + bias) - mean) / np.sqrt(var + 1e-3) + beta
    k, b = fold.fold("dense", kernel, bias, gamma, beta, mean, var, 1e-3)
    assert k.shape == (4, 6) and k.dtype == b.dtype == np.float32
    np.testing.assert_allclose(xs @ k.T + b, ref, atol=1e-5)
    s = fold.bn_scale(gamma, var, 1e-3)
    np.testing.assert_array_equal(fold.fold_kernel("dense", kernel.T, s), k)
    dw = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)
    assert fold.to_tflite("depthwise", dw).shape == (1, 3, 3, 8)
    np.testing.assert_array_equal(fold.to_keras("depthwise", fold.to_tflite("depthwise", dw), 2), dw)
    conv = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(fold.to_keras("conv", fold.to_tflite("conv", conv)), conv)


def test_fold_model_matches_keras(x):
    model = tiny_model(seg=True)
    folded = fold_model(model)
    assert {type(layer).__name__ for layer in folded.layers} & {"BatchNormalization"} == set()
    for a, b in zip(keras_outputs(folded, x), keras_outputs(model, x)):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("where", ["after_add", "activation", "shared"])
def test_a_bn_that_cannot_fold_becomes_its_own_affine(where):
    inp = keras.Input((8, 8, 3))
    c = layers.Conv2D(4, 1, activation="relu" if where == "activation" else None, name="c")(inp)
    t = layers.Add()([c, c]) if where == "after_add" else c
    out = layers.BatchNormalization(name="bn")(t)
    if where == "shared":
        out = layers.Add()([out, c])
    plan = {layer.name: (kind, bn and bn.name) for layer, kind, bn in fold_plan(keras.Model(inp, out))}
    assert plan == {"c": ("conv", None), "bn": ("affine", "bn")}


def test_a_bn_called_twice_or_across_channels_first_is_refused():
    inp = keras.Input((8, 8, 3))
    bn = layers.BatchNormalization(name="bn")
    c = layers.Conv2D(4, 1, name="c")(inp)
    with pytest.raises(FoldError, match="'bn' must be called exactly once"):
        fold_model(keras.Model(inp, layers.Add()([bn(c), bn(layers.ReLU()(c))])))
    with pytest.raises(FoldError, match="'bn2' normalises axis 1"):
        fold_model(keras.Model(inp, layers.BatchNormalization(axis=1, name="bn2")(c)))


def test_export_matches_keras(exported, x):
    model, path = exported
    outs = run_tflite(path.read_bytes(), x)
    ref = keras_outputs(model, x)
    assert [o.shape for o in outs] == [r.shape for r in ref]  # Keras output order kept
    for a, b in zip(outs, ref):
        assert np.max(np.abs(a - b)) <= 1e-4


def test_sidecar_roundtrip(exported):
    model, path = exported
    bundle = load_bundle(path)
    assert bundle.model_bytes == path.read_bytes()
    meta = bundle.meta
    assert (meta["format"], meta["model"], meta["task"], meta["input_size"]) == (1, "tiny", "segmentation", [16, 16])
    assert meta["preprocess"] == PRE and meta["labels"] == [f"c{i}" for i in range(5)]
    assert meta["head"] == {"k": [0, 1, 2]}
    names = [(r.name, r.kind, r.bn) for r in bundle.layers]
    assert names == [("stem.conv", "conv", "stem.bn"), ("b0.dw.conv", "depthwise", "b0.dw.bn"),
                     ("b0.pw.conv", "conv", "b0.pw.bn"), ("b1.dw.conv", "depthwise", "b1.dw.bn"),
                     ("b1.pw.conv", "conv", "b1.pw.bn"), ("fc", "dense", None), ("seg", "conv", None)]
    for rec in bundle.layers:
        layer = model.get_layer(rec.name)
        np.testing.assert_array_equal(rec.kernel, layer.kernel.numpy())
        assert (rec.bias is None) == (not layer.use_bias)
        if rec.bn:
            bn = model.get_layer(rec.bn)
            assert rec.eps == bn.epsilon and rec.b_buffer is not None
            for field, var in [("gamma", bn.gamma), ("beta", bn.beta), ("mean", bn.moving_mean),
                               ("var", bn.moving_variance)]:
                np.testing.assert_array_equal(getattr(rec, field), var.numpy())
    buffers = [r.w_buffer for r in bundle.layers] + [r.b_buffer for r in bundle.layers if r.b_buffer is not None]
    assert len(set(buffers)) == len(buffers)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_refold_reset_is_bit_identical_to_export(exported):
    bundle = load_bundle(exported[1])
    r = Refolder(bundle)
    r.reset()
    assert r.model_bytes() == bundle.model_bytes
    for rec in bundle.layers:
        if rec.bn:
            k, b = fold.fold(rec.kind, rec.kernel, rec.bias, rec.gamma, rec.beta, rec.mean, rec.var, rec.eps)
            np.testing.assert_array_equal(r.layer(rec.name).w, k)
            np.testing.assert_array_equal(r.layer(rec.bn).b, b)


def test_refold_stats_equals_reconversion(exported, x):
    bundle = load_bundle(exported[1])
    stats = new_stats(bundle, seed=1)
    r = Refolder(bundle)
    assert sorted(r.refold(stats)) == sorted(rec.name for rec in bundle.layers if rec.bn)
    assert r.refold(stats) == []  # unchanged statistics: nothing rewritten
    one = {"b0.pw.bn": stats["b0.pw.bn"]}
    one["b0.pw.bn"] = (one["b0.pw.bn"][0] + 1, one["b0.pw.bn"][1])
    assert r.refold(one) == ["b0.pw.conv"]
    stats.update(one)
    ref = reconvert(set_weights(tiny_model(seg=True), stats))
    got = r.interpreter()
    for a, b in zip(run_interpreter(got, *io_indices(got), x), run_tflite(ref, x)):
        assert np.max(np.abs(a - b)) <= 1e-5


def test_refold_noisy_kernels_equals_reconversion(exported, x):
    bundle = load_bundle(exported[1])
    rng = np.random.default_rng(2)
    kernels = {rec.name: rec.kernel * (1 + 0.1 * rng.standard_normal(rec.kernel.shape)).astype(np.float32)
               for rec in bundle.layers}
    stats = new_stats(bundle, seed=3)
    r = Refolder(bundle)
    assert len(r.refold(stats, kernels)) == len(bundle.layers)
    ref = reconvert(set_weights(tiny_model(seg=True), stats, kernels))
    for a, b in zip(run_tflite(r.model_bytes(), x), run_tflite(ref, x)):
        assert np.max(np.abs(a - b)) <= 1e-5


def test_output_order_is_fixed_in_place(exported, x):
    model, path = exported
    data = bytearray(path.read_bytes())
    _fix_outputs(data, x, keras_outputs(model, x)[::-1])  # pretend Keras had the outputs reversed
    outs = run_tflite(data, x)
    assert [o.shape for o in outs] == [(1, 8, 8, 5), (1, 10)]


def test_refolder_needs_sidecar(exported, tmp_path):
    (tmp_path / "m.tflite").write_bytes(exported[1].read_bytes())
    with pytest.warns(UserWarning, match="convert.py"):
        bundle = load_bundle(tmp_path / "m.tflite")
    assert bundle.meta["input_size"] == [16, 16] and not bundle.has_sidecar
    with pytest.raises(ValueError, match="sidecar"):
        Refolder(bundle)
    with pytest.raises(FileNotFoundError):
        load_bundle(tmp_path / "m.tflite", require_sidecar=True)


def test_refold_handles_buffers_stored_outside_the_flatbuffer():
    """Files over 2 GB keep buffer data after the flatbuffer (Buffer.offset/size): views must follow."""
    import flatbuffers
    import tflite

    from edge_cbn.runtime.bundle import Bundle, LayerRecord, buffer_span

    external_at = 1024
    b = flatbuffers.Builder(0)
    data = b.CreateByteVector(np.float32([9.0]).tobytes())
    tflite.BufferStart(b)
    empty = tflite.BufferEnd(b)
    tflite.BufferStart(b)
    tflite.BufferAddData(b, data)
    inline = tflite.BufferEnd(b)
    tflite.BufferStart(b)
    tflite.BufferAddOffset(b, external_at)
    tflite.BufferAddSize(b, 12)
    external = tflite.BufferEnd(b)
    tflite.ModelStartBuffersVector(b, 3)
    for buf in (external, inline, empty):
        b.PrependUOffsetTRelative(buf)
    buffers = b.EndVector()
    tflite.ModelStart(b)
    tflite.ModelAddBuffers(b, buffers)
    b.Finish(tflite.ModelEnd(b), b"TFL3")
    head = bytes(b.Output())
    model_bytes = head + bytes(external_at - len(head)) + np.float32([1, 2, 3]).tobytes()
    assert buffer_span(model_bytes, 0) == (0, 0) and buffer_span(model_bytes, 2) == (external_at, 12)
    with pytest.raises(ValueError, match="outside"):
        buffer_span(model_bytes[:-4], 2)

    kernel = np.float32([[1], [2], [3]])  # dense IO (3 -> 1)
    rec = LayerRecord("fc", "dense", "bn", 1e-3, w_buffer=2, b_buffer=1, kernel=kernel, bias=None,
                      gamma=np.float32([2]), beta=np.float32([0.5]), mean=np.float32([0]), var=np.float32([1]))
    r = Refolder(Bundle(None, model_bytes, {}, [rec]))
    assert r.model_bytes()[external_at:] == r.layer("fc").w.tobytes()  # written where the file keeps it
    assert r.refold({"bn": (np.float32([1.0]), np.float32([4.0]))}) == ["fc"]
    k, bias = fold.fold("dense", kernel, None, rec.gamma, rec.beta, np.float32([1.0]), np.float32([4.0]), 1e-3)
    out = r.model_bytes()
    assert out[external_at:] == k.tobytes() and out[:external_at] != model_bytes[:external_at]
    np.testing.assert_array_equal(r.layer("bn").b, bias)
