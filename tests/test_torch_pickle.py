import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from edge_cbn.convert.weights import torch_pickle
from edge_cbn.runtime.errors import BadInput

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
        "bf16": torch.randn(4, generator=g).bfloat16(),
        "expanded": torch.ones(1).expand(6),  # stride 0
    }


def _numpy(t):
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_both_torch_formats(tmp_path, zip_format):
    sd = _state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    got = torch_pickle.load(path)
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == _numpy(v).dtype and got[k].shape == tuple(v.shape), k
        np.testing.assert_array_equal(got[k], _numpy(v), err_msg=k)
    # views of one storage share one read-only array, nothing is copied per tensor
    assert np.shares_memory(got["fc.weight"], got["fc.bias"])
    assert not any(a.flags.writeable for a in got.values())


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
    with pytest.raises(torch_pickle.UnsafeCheckpoint, match="refusing to load.*(posix|os).system"):
        torch_pickle.load(path)
    assert issubclass(torch_pickle.UnsafeCheckpoint, BadInput)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_and_missing_files_are_one_line_naming_the_file(tmp_path, zip_format):
    path = tmp_path / "w.pth"
    torch.save(_state_dict(), path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(BadInput, match="truncated") as e:
        torch_pickle.load(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    with pytest.raises(BadInput, match="nope.pth: cannot be read"):
        torch_pickle.load(tmp_path / "nope.pth")
    with pytest.raises(BadInput, match="Is a directory"):
        torch_pickle.load(tmp_path)
    with pytest.raises(BadInput, match="not a regular file"):  # a device would be read forever
        torch_pickle.load("/dev/zero")


def test_memory_budget_grows_with_expected_bytes(tmp_path):
    """A 64 MB stride-0 view of one float is over the default budget of a tiny file (8x + 16 MB), and
    fits once the caller says the model's parameters take that much."""
    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(1).expand(16 << 20)}, path)
    with pytest.raises(BadInput, match="memory limit"):
        torch_pickle.load(path)
    got = torch_pickle.load(path, expected_bytes=64 << 20)
    assert got["w"].shape == (16 << 20,) and got["w"].strides == (0,)


def test_non_finite_and_negative_variance_name_the_tensor(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"bn.running_var": torch.tensor([1.0, -0.5]), "w": torch.ones(2)}, path)
    with pytest.raises(BadInput, match="'bn.running_var'.*negative"):
        torch_pickle.load(path)
    torch.save({"w": torch.tensor([1.0, float("nan")]).bfloat16()}, path)
    with pytest.raises(BadInput, match="'w'.*non-finite"):
        torch_pickle.load(path)


def test_unsupported_dtypes_are_named_not_called_unsafe(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(2).to(torch.float8_e5m2)}, path)
    with pytest.raises(BadInput, match="float8_e5m2 tensors are not supported") as e:
        torch_pickle.load(path)
    assert not isinstance(e.value, torch_pickle.UnsafeCheckpoint)
