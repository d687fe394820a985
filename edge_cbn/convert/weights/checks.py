"""What every weight file's tensors must pass, whatever the format (`.pth`, `.weights`): finite values,
BN variances that are not negative.  Both would otherwise be folded into the served model."""
from __future__ import annotations

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
