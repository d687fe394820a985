"""Property-based fuzzing (hypothesis) of the sidecar loader and the state loader, from the genuine files
of tests/hardening/bundle_corpus.py: raw byte mutations (flips, overwrites, truncation, insertion) and
structured ones (a member replaced by an array of another dtype, shape or values; a meta field replaced
by other JSON), saved as well-formed archives so they reach the checks behind the zip layer.

Property: the file loads and what loaded is valid (finite, var >= 0, shapes the model's), or it is a
`BadInput` naming the file; never another exception, never a hang (a 5 s alarm per example).  Fixed
budget: derandomized examples, `max_examples` per target, about 10 s in all."""
import contextlib
import io
import json
import shutil
import signal

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from edge_cbn.runtime.bundle import load_bundle, read_model, read_sidecar  # noqa: E402
from edge_cbn.runtime.errors import BadInput  # noqa: E402
from edge_cbn.runtime.state import StateStore, fingerprint  # noqa: E402
from edge_cbn.runtime.stream_calibrator import StreamCalibrator  # noqa: E402

from .bundle_corpus import STATE_SETUP, genuine_files  # noqa: E402

pytestmark = pytest.mark.hardening
BUDGET = settings(deadline=2000, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


GENUINE = {}  # "sidecar", "state": the genuine bytes the strategies mutate (named, not passed: short reprs)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """A directory with the genuine bundle and state, the model's facts and its loaded bundle."""
    pytest.importorskip("keras")
    genuine = genuine_files(tmp_path_factory.getbasetemp())
    root = tmp_path_factory.mktemp("fuzz")
    for src in (genuine.model, genuine.sidecar, genuine.calib, *genuine.state.parent.iterdir()):
        shutil.copy(src, root / src.name)
    GENUINE.update(sidecar=genuine.sidecar.read_bytes(), state=genuine.state.read_bytes())
    bundle = load_bundle(root / "tiny.tflite")
    return {"root": root, "facts": read_model(genuine.model)[1], "bundle": bundle}


@contextlib.contextmanager
def alarm(seconds=5):
    """A load that runs longer than `seconds` is a hang: fail the example."""
    def hang(*_):
        raise AssertionError(f"no result within {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def loads_valid_or_refused(load, path):
    """`load(path)`'s result, or None for a one-line BadInput naming `path`; any other exception fails."""
    with alarm():
        try:
            return load(path)
        except BadInput as e:
            assert str(path) in str(e) and "\n" not in str(e), str(e)
            return None


# ------------------------------------------------------------------------------------- mutations
byte_edits = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8)


@st.composite
def mutated_bytes(draw, source: str) -> bytes:
    """The genuine `source` bytes overwritten at a few places, then maybe truncated or with a chunk inserted."""
    out = bytearray(GENUINE[source])
    for where, value in draw(byte_edits):
        out[int(where * len(out))] = value
    tail = draw(st.sampled_from(["keep", "truncate", "insert"]))
    cut = int(draw(st.floats(0, 1)) * len(out))
    if tail == "truncate":
        del out[cut:]
    elif tail == "insert":
        out[cut:cut] = draw(st.binary(min_size=1, max_size=64))
    return bytes(out)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4), max_leaves=12)
arrays = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.bool_, np.dtype("<U3")]),
                    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))


def _archive(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@st.composite
def mutated_archive(draw, source: str) -> bytes:
    """The genuine `source` .npz with one member replaced by another array, or one meta field by other JSON
    (or removed)."""
    members = _archive(GENUINE[source])
    meta = json.loads(members["meta"].item())
    if draw(st.booleans()):
        members[draw(st.sampled_from(sorted(members)))] = draw(arrays)
    else:
        key = draw(st.sampled_from(sorted(meta)))
        target = meta
        while isinstance(target[key], dict) and target[key] and draw(st.booleans()):  # maybe a nested field
            target, key = target[key], draw(st.sampled_from(sorted(target[key])))
        if draw(st.booleans()):
            target[key] = draw(json_values)
        else:
            del target[key]
        members["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **members)
    return buf.getvalue()


# -------------------------------------------------------------------------------------- properties
def check_sidecar(fuzz, data: bytes) -> None:
    path = fuzz["root"] / "mutated.cbn.npz"
    path.write_bytes(data)
    loaded = loads_valid_or_refused(lambda p: read_sidecar(p, fuzz["facts"]), path)
    if loaded is None:
        return
    meta, layers = loaded
    assert tuple(meta["input_size"]) == fuzz["facts"].input_hw
    for rec in layers:
        assert rec.kernel.dtype == np.float32 and np.isfinite(rec.kernel).all()
        if rec.bn:
            assert rec.mean.shape == rec.var.shape and np.isfinite(rec.mean).all() and (rec.var >= 0).all()


def load_state(path, bundle):
    """The state loader as the stream runs it (bundle already loaded): state and calibrator part."""
    calibrator = StreamCalibrator(bundle, mode=STATE_SETUP["mode"], stages=STATE_SETUP["stages"], refold_every=1)
    resumed = StateStore(path, bundle, fingerprint(bundle, **STATE_SETUP)).load(calibrator=calibrator)
    for mean, var in calibrator.statistics().values():  # what it would hand out next
        assert np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all()
    return resumed


def check_state(fuzz, data: bytes) -> None:
    path = fuzz["root"] / "st.npz"
    path.write_bytes(data)
    resumed = loads_valid_or_refused(lambda p: load_state(p, fuzz["bundle"]), path)
    if resumed is None:
        return
    for mean, var in resumed.stats.values():
        assert mean.dtype == np.float32 and np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all()
    assert all(isinstance(v, int) and v >= 0 for v in resumed.counters.values())


@given(data=st.data())
@settings(BUDGET, max_examples=300)
def test_fuzz_sidecar_bytes(fuzz, data):
    check_sidecar(fuzz, data.draw(mutated_bytes("sidecar")))


@given(data=st.data())
@settings(BUDGET, max_examples=250)
def test_fuzz_sidecar_members(fuzz, data):
    check_sidecar(fuzz, data.draw(mutated_archive("sidecar")))


@given(data=st.data())
@settings(BUDGET, max_examples=300)
def test_fuzz_state_bytes(fuzz, data):
    check_state(fuzz, data.draw(mutated_bytes("state")))


@given(data=st.data())
@settings(BUDGET, max_examples=150)
def test_fuzz_state_members(fuzz, data):
    check_state(fuzz, data.draw(mutated_archive("state")))
