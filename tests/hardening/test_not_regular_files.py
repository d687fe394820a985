"""Paths that are not regular files: a FIFO (reading one waits for a writer forever), a directory, a
device, a link to nothing.  Each is refused at once with one line saying what it is, wherever a file is
read: a model, a sidecar or state (.npz), a --weights file, a dataset image, a --model path."""
import os
import threading

import pytest

from edge_cbn.runtime.bundle import load_bundle
from edge_cbn.runtime.errors import BadInput
from edge_cbn.runtime.validation import open_npz, regular_file

pytestmark = pytest.mark.hardening


def not_regular(tmp_path, kind: str, name: str):
    path = tmp_path / name
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling link":
        path.symlink_to(tmp_path / "nothing-here")
    elif kind == "device":
        path.symlink_to("/dev/zero")
    return path


def refused_at_once(fn, *args) -> BadInput:
    """`fn(*args)`'s BadInput, which must come within 10 s (a read of a FIFO would block for ever)."""
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_raised(fn, *args)), daemon=True)
    worker.start()
    worker.join(10)
    assert outcome, f"{fn.__name__} blocked on {args[0]}"
    assert isinstance(outcome[0], BadInput), outcome[0]
    return outcome[0]


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - returned for the assertion
        return e
    return None


KINDS = {"fifo": "FIFO", "directory": "directory", "dangling link": "a link to nothing", "device": "device"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reader, name", [(load_bundle, "m.tflite"), (lambda p: open_npz(p).__enter__(), "s.npz"),
                                          (regular_file, "w.pth")])
def test_a_path_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind, reader, name):
    path = not_regular(tmp_path, kind, name)
    error = refused_at_once(reader, path)
    assert error.path == str(path) and KINDS[kind] in error.reason


def test_dataset_images_and_the_model_path_too(tmp_path):
    from edge_cbn.lab.evaluate.datasets import read_bgr
    from edge_cbn.stream.resolve import resolve_model

    fifo = not_regular(tmp_path, "fifo", "n01440764_1.JPEG")
    assert "FIFO" in refused_at_once(read_bgr, fifo).reason
    folder = not_regular(tmp_path, "directory", "model.tflite")
    assert refused_at_once(resolve_model, str(folder)).reason == "is a directory, not a file"


def test_a_planted_file_in_the_shared_model_folder_is_written_anew(tmp_path, monkeypatch):
    """`--workers` wrote the model back to a folder of a predictable name in the shared temporary
    directory and trusted any file of the right size there (a planted sidecar moved mAP 70.88 -> 66.18):
    now only a file whose content is the payload's is used."""
    import tempfile

    from edge_cbn.lab.evaluate.sweep_worker import model_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    files = {"m.tflite": b"model bytes", "m.cbn.npz": b"sidecar bytes"}
    folder = model_folder(files)
    (folder / "m.cbn.npz").write_bytes(b"planted bytes")  # the same size, another content
    (folder / "m.tflite").unlink()
    (folder / "m.tflite").symlink_to(tmp_path / "elsewhere")  # a link where the model goes
    assert model_folder(files) == folder
    assert {name: (folder / name).read_bytes() for name in files} == files
    assert not (folder / "m.tflite").is_symlink() and not (tmp_path / "elsewhere").exists()
