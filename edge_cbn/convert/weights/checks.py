"""What every weight file must pass, whatever the format (`.pth`, `.weights`, `.safetensors`): finite
values and BN variances that are not negative, which would otherwise be folded into the served model;
and, for a file under a published name that carries its hash, that hash."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from ...runtime.errors import BadInput
from .assign import WeightMismatch


class MismatchedWeightFile(BadInput, WeightMismatch):
    """A weight file that does not fit the model: one line naming the file (BadInput), which callers of
    the `assign_*` functions may still catch as WeightMismatch."""


def check_values(path, name: str, array: np.ndarray, *, variance: bool = False) -> None:
    """Refuse `array` (the tensor `name` of the file at `path`) if it holds NaN or Inf, or, for a BN
    variance, a negative value."""
    if array.dtype.kind not in "fc":
        return
    finite = np.isfinite(array)
    if not finite.all():
        bad = array.size - int(np.count_nonzero(finite))
        raise BadInput(path, f"tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf) among {array.size}; "
                             "refusing weights that would be folded into the served model")
    if variance and array.dtype.kind == "f" and array.size and array.min() < 0:
        raise BadInput(path, f"BN variance {name!r} holds {int(np.count_nonzero(array < 0))} negative value(s) "
                             f"(min {float(array.min()):.3g}); a variance cannot be negative")


# torchvision's published files carry the start of their sha256 in the name (resnet50-0676ba61.pth), which
# torch.hub checks after a download (`check_hash`): the same check here, since a legacy-format .pth has
# no checksum of its own and a flipped bit in it would otherwise load as a changed weight.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.(?:pth|pt)$")


def file_sha256(path) -> str:
    """Hex sha256 of the file at `path`, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_published_hash(path) -> None:
    """Refuse the file at `path` when its name carries a sha256 prefix (torchvision's `name-<hash>.pth`)
    that its content does not match: a damaged or altered download.  Files named otherwise pass.

    Raises:
        BadInput: the content's sha256 does not start with the hash in the name.
    """
    match = _HASH_IN_NAME.search(Path(path).name)
    if match is None:
        return
    digest = file_sha256(path)
    if not digest.startswith(match.group(1)):
        raise BadInput(path, f"sha256 {digest[:len(match.group(1))]}... does not match the "
                             f"{match.group(1)} its published name carries: a damaged or altered download")
