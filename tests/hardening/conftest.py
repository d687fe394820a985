"""Fixtures shared by the corpus tests."""
import pytest

from .bundle_corpus import CANARY_ENV, genuine_files


@pytest.fixture(scope="session")
def genuine(tmp_path_factory):
    """One genuine tiny bundle, calibration variant and state per session; every case derives from it."""
    pytest.importorskip("keras")
    return genuine_files(tmp_path_factory.getbasetemp())


@pytest.fixture
def canary(tmp_path, monkeypatch):
    """The file a payload would create if anything in a corpus file were unpickled."""
    path = tmp_path / "canary"
    monkeypatch.setenv(CANARY_ENV, str(path))
    return path
