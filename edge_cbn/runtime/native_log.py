"""TensorFlow's and LiteRT's native log, kept off the user's terminal.

They print from C++ straight to file descriptor 2 (absl logging before `absl::InitializeLog`, which
`TF_CPP_MIN_LOG_LEVEL` does not reach), so `silenced()` points descriptor 2 at /dev/null around the calls
that print it: importing TensorFlow and its first device query (the oneDNN notice, CUDA probing, the
cuInit error, the CPU-feature notice), a TFLite conversion, and the first LiteRT interpreter (XNNPACK's
"Created delegate" line).  `TF_CPP_MIN_LOG_LEVEL=0` in the environment, which `--verbose` sets, lets
everything through.
"""
from __future__ import annotations

import contextlib
import os
import sys


def verbose() -> bool:
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0"


@contextlib.contextmanager
def silenced():
    """Descriptor 2 to /dev/null for the block (a no-op when verbose or when it cannot be redirected)."""
    if verbose():
        yield
        return
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):
        yield
        return
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
