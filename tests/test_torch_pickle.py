import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from edge_cbn.convert.weights import torch_pickle

torch = pytest.importorskip("torch")


def _state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    return {
        "conv.weight": torch.randn(3, 2, 3, 3, generator=g),
        "bn.running_var": torch.rand(3, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.weight": base.t(),  # a non-contiguous view: exercises strides
        "fc.bias": base[2:4, 1],  # a view with an offset into a shared storage
        "half": torch.randn(5, generator=g).half(),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_both_torch_formats(tmp_path, zip_format):
    sd = _state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    got = torch_pickle.load(path)
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.numpy().dtype, k
        np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)


def test_unwraps_state_dict_key(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}, "epoch": 3}, path)
    assert list(torch_pickle.load(path)) == ["a"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_zip(path, marker):
    data = pickle.dumps({"conv.weight": _Evil(marker)}, protocol=2)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/version", "3\n")


def _evil_legacy(path, marker):
    buf = io.BytesIO()
    for obj in (torch_pickle.LEGACY_MAGIC, 1001, {}):
        pickle.dump(obj, buf, protocol=2)
    pickle.dump({"conv.weight": _Evil(marker)}, buf, protocol=2)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("writer", [_evil_zip, _evil_legacy], ids=["zip", "legacy"])
def test_refuses_pickle_that_calls_os_system(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    writer(path, marker)
    with pytest.raises(torch_pickle.UnsafeCheckpoint, match="posix.system|os.system"):
        torch_pickle.load(path)
    assert not marker.exists()


def test_truncated_and_missing_files_give_clear_errors(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_state_dict(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match="truncated|not a readable"):
        torch_pickle.load(path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        torch_pickle.load(tmp_path / "nope.pth")
