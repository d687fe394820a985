"""edge-cbn: Calibrated BatchNorm for CNNs on noisy analog-style hardware at the edge.

The Python API (docs/API.md), imported on first use so that `import edge_cbn` stays light:

    CalibratedModel.from_file(path, noise=Relative(eta=0.05), seed=0)
                                             the task object: .calibrate(frames), .predict(frame),
                                             .process(frame, index) (the stream's step), .save(path)
    Paper, Relative, AdditiveMax, PCM        the noise models, typed (`--noise` presets)
    load_bundle(path)                        an exported model: X.tflite + X.cbn.npz (+ X.calib.tflite, X.sweep.tflite)
    make_noise(preset, eta, seed)            a simulated noise model; .instantiate(noise_targets(bundle)) = a chip
    NoisyModel(bundle, chip)                 run it noisy (`.run(x, frame)`), refold statistics (`.set_stats`)
    Processor(bundle)                        BGR frame -> model input, outputs -> predictions
    DeviceCalibration(bundle, chip)          streaming batch-size-1 calibration (`.step`, `.calibrate`)
    Refolder(bundle)                         new statistics into the .tflite bytes (`.refold`, `.model_bytes`)
    export(keras_model, path, ...)           fold BN and export a bundle (workstation: TensorFlow)
    export_own_model(model, path, labels=...)  your own Keras model (or .keras file) as a bundle (workstation)
    calibrate_bn(keras_model, batches, ...)  the paper's offline Algorithm 1 (workstation: TensorFlow)
    make_pool(workers, ray_address)          local worker processes or a Ray cluster (workstation)
    calibrate_in_parallel(model, files, pool, ...)  Algorithm 1's batches on a pool (workstation)
    Engine, StreamLoop, StreamOptions        the `edge-cbn stream` app
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

__version__ = "0.2.0"
# Image decoding's pixel bound (runtime/images.py).  OpenCV reads its own when it loads, so it is set here,
# before any module of the package imports cv2, for the formats whose size edge-cbn does not read itself.
MAX_IMAGE_PIXELS = 50_000_000
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))

_API = {
    "CalibratedModel": "edge_cbn.stream.calibrated_model", "CalibratedModelOptions": "edge_cbn.stream.calibrated_model",
    "CalibrationOptions": "edge_cbn.stream.calibrated_model",
    "NoiseModel": "edge_cbn.runtime.noise_models", "Paper": "edge_cbn.runtime.noise_models",
    "Relative": "edge_cbn.runtime.noise_models", "AdditiveMax": "edge_cbn.runtime.noise_models",
    "PCM": "edge_cbn.runtime.noise_models", "noise_model": "edge_cbn.runtime.noise_models",
    "Bundle": "edge_cbn.runtime.bundle", "load_bundle": "edge_cbn.runtime.bundle",
    "make_noise": "edge_cbn.runtime.noise", "PRESETS": "edge_cbn.runtime.noise",
    "NoisyModel": "edge_cbn.runtime.noisy_model", "noise_targets": "edge_cbn.runtime.noisy_model",
    "Processor": "edge_cbn.runtime.processing", "model_input": "edge_cbn.runtime.processing",
    "DeviceCalibration": "edge_cbn.runtime.device_calibration",
    "StreamCalibrator": "edge_cbn.runtime.stream_calibrator",
    "Refolder": "edge_cbn.runtime.refold",
    "Engine": "edge_cbn.stream.engine", "StreamLoop": "edge_cbn.stream.loop", "StreamOptions": "edge_cbn.stream.options",
    "export": "edge_cbn.convert.export", "build_model": "edge_cbn.convert.build",
    "export_own_model": "edge_cbn.convert.own_model",
    "calibrate_bn": "edge_cbn.convert.offline_calibration",
    "make_pool": "edge_cbn.cluster", "calibrate_in_parallel": "edge_cbn.convert.parallel_calibration",
}
__all__ = sorted(_API)

if TYPE_CHECKING:  # what editors and type checkers resolve; at run time __getattr__ imports on first use
    from .cluster import make_pool
    from .convert.build import build_model
    from .convert.export import export
    from .convert.offline_calibration import calibrate_bn
    from .convert.own_model import export_own_model
    from .convert.parallel_calibration import calibrate_in_parallel
    from .runtime.bundle import Bundle, load_bundle
    from .runtime.device_calibration import DeviceCalibration
    from .runtime.noise import PRESETS, make_noise
    from .runtime.noise_models import PCM, AdditiveMax, NoiseModel, Paper, Relative, noise_model
    from .runtime.noisy_model import NoisyModel, noise_targets
    from .runtime.processing import Processor, model_input
    from .runtime.refold import Refolder
    from .runtime.stream_calibrator import StreamCalibrator
    from .stream.calibrated_model import CalibratedModel, CalibratedModelOptions, CalibrationOptions
    from .stream.engine import Engine
    from .stream.loop import StreamLoop
    from .stream.options import StreamOptions


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'edge_cbn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
