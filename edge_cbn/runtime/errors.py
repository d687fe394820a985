"""The one exception type for input edge-cbn cannot use: a file, a frame source, a saved state.  Every
command catches it at the top (`edge_cbn.cli`) and prints one line naming the input and the reason,
exit status 1; `--debug` shows the traceback instead."""
from __future__ import annotations


class BadInput(ValueError):
    """`path` (a file, a camera, a URL) cannot be used, because of `reason` (one line)."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # from a worker process to the driver as it was raised
        return type(self), (self.path, self.reason)
