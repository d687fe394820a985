"""What edge-cbn reports as the user's to fix, not as a bug: `BadInput` (a file, a frame source, a saved
state, a value the user gave) and `MissingDependency` (an optional package or a native library that is
not installed).  Every command catches them at the top (`edge_cbn.cli`) and prints one line, exit status
1; `--debug` shows the traceback instead.  Usage errors stay click's (exit status 2)."""
from __future__ import annotations


class BadInput(ValueError):
    """`path` (a file, a camera, a URL) cannot be used, because of `reason` (one line)."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # from a worker process to the driver as it was raised
        return type(self), (self.path, self.reason)


class MissingDependency(ImportError):
    """`what` (a package, a native library) is not installed; `install` says how to get it, e.g. the
    extra: "pip install 'edge-cbn[cluster]'"."""

    def __init__(self, what: str, install: str):
        self.what, self.install = what, install
        super().__init__(f"{what} is not installed: {install}")

    def __reduce__(self):
        return type(self), (self.what, self.install)
