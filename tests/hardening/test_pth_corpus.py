"""The `.pth` corpus (tests/hardening/pth_corpus.py): every hostile checkpoint, zip or legacy, is refused
with one line naming the file within 10 s and 512 MB, runs nothing (the canary), and every genuine one
loads with its values.  After hostile files, a genuine checkpoint still loads in the same process."""
import collections
import dataclasses
import re

import numpy as np
import pytest

from edge_cbn.convert.weights import pickle_machine, torch_pickle
from edge_cbn.runtime.errors import BadInput

from .harness import run_case
from .pth_corpus import CANARY, STATE_SETTING, genuine_views, legacy_bytes, pth_cases, state, zip_bytes

pytestmark = pytest.mark.hardening

CASES = pth_cases()


def assert_same(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        value = np.asarray(value)
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pth_case(case, tmp_path):
    if case.needs_torch:
        pytest.importorskip("torch", reason="a file that torch.save writes: made with torch, which is not installed")
    path = case.write(tmp_path)
    result = run_case(torch_pickle.load, path)
    if case.loads:
        assert result.kind == "loaded" and result.seconds < 10 and result.added_rss_mb < 512, result
        assert_same(torch_pickle.load(path), case.expected())
    else:
        assert result.ok_refusal(path), result
        assert case.match is None or re.search(case.match, result.message), result.message
    assert not (tmp_path / CANARY).exists()


def test_corpus_covers_both_formats_and_every_class():
    names = [c.name for c in CASES]
    assert len(CASES) >= 70 and len(set(names)) == len(names)
    assert sum(n.endswith("-zip") for n in names) >= 30 and sum(n.endswith("-legacy") for n in names) >= 30
    faults = collections.Counter(c.fault for c in CASES)
    assert set(faults) == {"code execution", "tensor layout", "shared storage", "zip container", "legacy stream",
                           "pickle machine", "dtypes and values", "non-finite values"}


def _allowlist() -> dict:
    return {key: dataclasses.astuple(value) for key, value in pickle_machine._GLOBALS.items()}


def test_hostile_files_leave_the_reader_unpoisoned(tmp_path):
    """Every state-setting file, zip and legacy, is refused in this process; then the allowlist the
    machine pushes is unchanged and genuine files load, equal."""
    before = _allowlist()
    for name, entry in STATE_SETTING.items():
        for container in (zip_bytes, legacy_bytes):
            path = tmp_path / f"{name}-{container.__name__}.pth"
            path.write_bytes(container(state(bad=entry)))
            with pytest.raises(BadInput, match=re.escape(str(path))):
                torch_pickle.load(path)
    assert _allowlist() == before
    path = tmp_path / "genuine.pth"
    pkl, expected = genuine_views()
    path.write_bytes(zip_bytes(pkl))
    assert_same(torch_pickle.load(path), expected)


def test_views_share_one_read_only_array_per_storage(tmp_path):
    path = tmp_path / "views.pth"
    path.write_bytes(zip_bytes(genuine_views()[0]))
    got = torch_pickle.load(path)
    assert all(not a.flags.writeable for a in got.values())
    assert np.shares_memory(got["rows"], got["transposed"]) and np.shares_memory(got["rows"], got["expanded"])
