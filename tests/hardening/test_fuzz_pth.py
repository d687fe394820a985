"""Property-based fuzzing of the `.pth` reader with hypothesis, for a fixed budget: genuine small
checkpoints (zip and legacy, from torch and assembled) with bytes flipped, cut, inserted, overwritten or
deleted, and random streams of pickle opcodes in either container.  Property: `load` either returns a
dict of finite read-only numpy arrays or raises BadInput (one line naming the file) -- never another
exception, and never more than 5 s (an alarm) or 512 MB of peak RSS over the run.  The examples run in
this process, hundreds a second; the corpus (test_pth_corpus.py) runs each case in a forked child."""
import contextlib
import io
import resource
import signal
import zipfile

import numpy as np
import pytest

from edge_cbn.convert.weights import torch_pickle
from edge_cbn.runtime.errors import BadInput

from .pth_corpus import (BINPERSID, BUILD, EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, MARK, NEWFALSE, REDUCE, SETITEMS,
                         TUPLE, genuine_views, glob, legacy_bytes, num, pickled, state, storage, text, zip_bytes)

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
pytestmark = pytest.mark.hardening

BUDGET = hypothesis.settings(max_examples=600, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
EXAMPLE_SECONDS = 5
RSS_LIMIT_MB = 512


def _torch_seeds() -> list[bytes]:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    sd = {**module.state_dict(), "bf": torch.randn(3).bfloat16(), "half": torch.randn(2).half(),
          "view": torch.randn(4, 3).t()}
    seeds = []
    for zip_format in (True, False):
        buf = io.BytesIO()
        torch.save(sd, buf, _use_new_zipfile_serialization=zip_format)
        seeds.append(buf.getvalue())
    return seeds


@pytest.fixture(scope="module")
def seeds() -> list[bytes]:
    views = genuine_views()[0]
    return _torch_seeds() + [zip_bytes(views), legacy_bytes(views)]


@pytest.fixture(scope="module")
def zip_parts(seeds) -> list[tuple[bytes, dict]]:
    """(data.pkl, {storage key: bytes}) of the zip seeds: a zip's CRCs stop most byte mutations, so the
    pickle is mutated on its own and zipped again."""
    parts = []
    for data in (seeds[0], seeds[2]):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            root = next(n for n in zf.namelist() if n.endswith("data.pkl"))[: -len("data.pkl")]
            storages = {n[len(root) + 5:]: zf.read(n) for n in zf.namelist() if n.startswith(f"{root}data/")}
            parts.append((zf.read(f"{root}data.pkl"), storages))
    return parts


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(autouse=True)
def rss_bound():
    """The run's peak RSS may grow by less than RSS_LIMIT_MB: no example allocated more than that."""
    before = _peak_rss_mb()
    yield
    assert _peak_rss_mb() - before < RSS_LIMIT_MB


@contextlib.contextmanager
def time_bound(seconds: int):
    def hang(*_):
        raise TimeoutError(f"load ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_property(path, data: bytes) -> None:
    """`load` gives a dict of finite, read-only arrays named by strings, or one BadInput line naming `path`."""
    path.write_bytes(data)
    try:
        with time_bound(EXAMPLE_SECONDS):
            out = torch_pickle.load(path)
    except BadInput as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        return
    assert isinstance(out, dict) and out
    for name, value in out.items():
        assert type(name) is str and isinstance(value, np.ndarray) and not value.flags.writeable, name
        assert value.dtype.kind not in "fc" or np.isfinite(value).all(), name


_POSITION = st.integers(0, 1 << 20)
_MUTATION = st.one_of(
    st.tuples(st.just("flip"), _POSITION, st.integers(0, 7)),
    st.tuples(st.just("cut"), _POSITION),
    st.tuples(st.just("insert"), _POSITION, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("overwrite"), _POSITION, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), _POSITION, st.integers(1, 64)),
)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for op, where, *arg in mutations:
        at = where % max(len(out), 1)
        if op == "flip" and out:
            out[at] ^= 1 << arg[0]
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = arg[0]
        elif op == "overwrite":
            out[at:at + len(arg[0])] = arg[0]
        elif op == "delete":
            del out[at:at + arg[0]]
    return bytes(out)


@BUDGET
@hypothesis.given(which=st.integers(0, 3), mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_genuine_checkpoints(seeds, tmp_path_factory, which, mutations):
    path = tmp_path_factory.mktemp("mutated") / "m.pth"
    assert_property(path, mutate(seeds[which], mutations))


@BUDGET
@hypothesis.given(which=st.integers(0, 1), mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_pickles_in_valid_zips(zip_parts, tmp_path_factory, which, mutations):
    pkl, storages = zip_parts[which]
    path = tmp_path_factory.mktemp("mutated") / "p.pth"
    assert_property(path, zip_bytes(mutate(pkl, mutations), storages))


# Snippets a random stream is made of: every opcode the machine knows, with plausible arguments.
_SNIPPETS = st.one_of(
    st.sampled_from([MARK, TUPLE, REDUCE, BUILD, SETITEMS, BINPERSID, EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, NEWFALSE,
                     b"N", b"0", b"1", b"2", b"a", b"e", b"s", b"l", b"d", b"\x85", b"\x86", b"\x87", b"\x88",
                     b"\x8f", b"\x90", b"\x91", b"\x94", b"\x81", b"q\x00", b"q\x01", b"h\x00", b"h\x01",
                     b"\x93", b"\x95" + bytes(8), b"\xff"]),
    st.one_of(st.integers(-2**70, 2**70), st.sampled_from([2**62, 2**64, 2**20000, -2**20000])).map(num),
    st.text(max_size=8).map(text),
    st.sampled_from([glob("torch._utils", "_rebuild_tensor_v2"), glob("torch._utils", "_rebuild_parameter"),
                     glob("collections", "OrderedDict"), glob("torch", "FloatStorage"), glob("torch", "bfloat16"),
                     glob("torch._utils", "_rebuild_tensor_v3"), glob("torch.storage", "UntypedStorage"),
                     glob("os", "system"), storage(), storage(numel=4, stype="BFloat16Storage"), text("storage")]),
)


@BUDGET
@hypothesis.given(snippets=st.lists(_SNIPPETS, max_size=40), legacy=st.booleans(), prefix=st.booleans())
def test_random_opcode_streams(tmp_path_factory, snippets, legacy, prefix):
    """Random opcodes, optionally after a genuine state dict's opening (so more streams reach tensors)."""
    body = b"".join(snippets)
    pkl = pickled((state()[2:-1] if prefix else b"") + body)
    path = tmp_path_factory.mktemp("stream") / "s.pth"
    assert_property(path, legacy_bytes(pkl) if legacy else zip_bytes(pkl))
