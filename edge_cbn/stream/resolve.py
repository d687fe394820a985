"""Device side: turn `--model NAME|FILE.tflite` into an exported bundle path.

A `.tflite` path is used as is.  A registered name means the cached export in `cache_dir()`; when it is
missing it is built on first use, which needs the workstation extra (`pip install edge-cbn[convert]`) —
on a board, copy a converted model over instead (see device/README.md)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .bundle import calibration_path, sidecar_path
from .paths import cache_dir

DEFAULT_MODEL = "efficientnet_lite0"


class ModelNotFound(Exception):
    pass


def resolve_model(model: str | None, *, echo=print) -> Path:
    model = model or DEFAULT_MODEL
    if model.endswith(".tflite"):
        path = Path(model)
        if not path.is_file():
            raise ModelNotFound(f"model file {model} does not exist")
        return path
    path = cache_dir() / f"{model}.tflite"
    if all(p.is_file() for p in (path, sidecar_path(path), calibration_path(path))):
        return path
    if importlib.util.find_spec("tensorflow") is None:
        raise ModelNotFound(
            f"{model} is not converted yet and TensorFlow is not installed here: convert it on a workstation "
            f"with `python tools/convert.py --model {model} -o {model}.tflite` and pass --model {model}.tflite"
        )
    from .convert import build_model, export_model

    echo(f"first use of {model}: converting it once into {path}", file=sys.stderr)
    try:
        spec, keras_model = build_model(model, quiet=False)
    except KeyError as e:
        raise ModelNotFound(str(e.args[0])) from None
    return export_model(spec, keras_model, path, quiet=False)
