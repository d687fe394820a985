"""`.safetensors` weights (`convert/weights/safetensors_file.py`): genuine files read exactly as the
reference library writes them, hostile and broken ones refused in one line naming the file."""
import json
import struct

import numpy as np
import pytest

from edge_cbn.convert.weights.safetensors_file import MAX_HEADER_BYTES, load, looks_like_safetensors
from edge_cbn.runtime.errors import BadInput

pytestmark = pytest.mark.hardening


def raw(header: dict, data: bytes = b"", *, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_a_genuine_file_reads_exactly_as_written(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {"conv1.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
               "bn1.running_var": rng.uniform(0.1, 2, 8).astype(np.float32),
               "bn1.num_batches_tracked": np.array(7, np.int64), "fc.weight": rng.standard_normal((4, 8)).astype(np.float16)}
    path = tmp_path / "m.safetensors"
    st.save_file(tensors, str(path), metadata={"format": "pt"})
    got = load(path)
    assert list(got) == list(tensors) or set(got) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(got[name], value.astype(np.float32) if value.dtype == np.float16 else value)
        assert not got[name].flags.writeable
    assert looks_like_safetensors(path.read_bytes()[:16])


def test_bfloat16_is_widened_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2")
    path = tmp_path / "b.safetensors"
    path.write_bytes(raw({"w": entry("BF16", [3], 0, 6)}, bf16.tobytes()))
    np.testing.assert_array_equal(load(path)["w"], values)


F32_2 = np.array([1.0, 2.0], "<f4").tobytes()
CASES = {
    "empty": (b"", "shorter than its header length"),
    "huge-declared-header": (struct.pack("<Q", 1 << 60) + b"{}", "the format's limit"),
    "header-past-the-end": (raw({}, length=4096), "more than the file's"),
    "not-json": (struct.pack("<Q", 5) + b"{abc}", "not valid JSON"),
    "not-utf8": (struct.pack("<Q", 3) + b'{"\xff', "not valid JSON"),
    "a-list": (raw([1, 2]), "JSON list, not an object"),
    "deep-nesting": (struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    "metadata-not-strings": (raw({"__metadata__": {"a": 1}}), "__metadata__"),
    "entry-not-a-dict": (raw({"w": [1, 2]}), "exactly dtype, shape and data_offsets"),
    "entry-extra-key": (raw({"w": {**entry("F32", [2], 0, 8), "x": 1}}, F32_2), "exactly dtype"),
    "unknown-dtype": (raw({"w": entry("F128", [2], 0, 8)}, F32_2), "unknown dtype"),
    "negative-dim": (raw({"w": entry("F32", [-2], 0, 8)}, F32_2), "non-negative integers"),
    "string-dim": (raw({"w": entry("F32", ["2"], 0, 8)}, F32_2), "non-negative integers"),
    "too-many-dims": (raw({"w": entry("F32", [1] * 33, 0, 4)}, F32_2[:4]), "at most 32"),
    "offsets-reversed": (raw({"w": entry("F32", [2], 8, 0)}, F32_2), "0 <= begin <= end"),
    "offsets-floats": (raw({"w": entry("F32", [2], 0.0, 8.0)}, F32_2), "0 <= begin <= end"),
    "size-mismatch": (raw({"w": entry("F32", [3], 0, 8)}, F32_2), "bytes for shape"),
    "overflowing-shape": (raw({"w": entry("F32", [1 << 40, 1 << 40], 0, 8)}, F32_2), "bytes for shape"),
    "overlap": (raw({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, F32_2 + F32_2[:4]),
                "without gap or overlap"),
    "gap": (raw({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, F32_2 + F32_2[:4]),
            "without gap or overlap"),
    "truncated-data": (raw({"w": entry("F32", [2], 0, 8)}, F32_2[:6]), "the file holds 6"),
    "trailing-bytes": (raw({"w": entry("F32", [2], 0, 8)}, F32_2 + b"xx"), "the file holds 10"),
    "nan": (raw({"w": entry("F32", [2], 0, 8)}, np.array([1, np.nan], "<f4").tobytes()), "non-finite"),
    "negative-variance": (raw({"bn.running_var": entry("F32", [2], 0, 8)}, np.array([1, -1], "<f4").tobytes()),
                          "cannot be negative"),
}


@pytest.mark.parametrize("name", CASES)
def test_a_broken_or_hostile_file_is_refused_in_one_line(tmp_path, name):
    data, reason = CASES[name]
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    with pytest.raises(BadInput) as error:
        load(path)
    message = str(error.value)
    assert str(path) in message and reason in message and "\n" not in message
    assert MAX_HEADER_BYTES == 100_000_000


def test_a_path_that_is_not_a_regular_file_is_refused(tmp_path):
    import os

    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="FIFO"):
        load(fifo)  # opening it would wait for a writer forever
    with pytest.raises(BadInput, match="directory"):
        load(tmp_path)


def test_a_zoo_model_loads_from_safetensors_as_from_its_state_dict(tmp_path):
    """The same state-dict names as torchvision's `.pth`, through `build_model(name, weights)`."""
    st = pytest.importorskip("safetensors.numpy")
    pytest.importorskip("keras")
    from edge_cbn.convert.build import build_model
    from edge_cbn.convert.weights.assign import assign_state_dict, random_state_dict

    _, reference = build_model("mobilenet_v2", allow_random=True, quiet=True)
    state = {k: np.ascontiguousarray(v) for k, v in random_state_dict(reference, 3).items()}
    assign_state_dict(reference, state)
    path = tmp_path / "mobilenet_v2.safetensors"
    st.save_file(state, str(path))
    _, model = build_model("mobilenet_v2", str(path), quiet=True)
    for mine, theirs in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
