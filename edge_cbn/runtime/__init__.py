"""The device runtime: what a board installs (numpy, OpenCV, LiteRT; never TensorFlow).

An exported bundle (`bundle`), its folding arithmetic (`fold`) and refold into the flatbuffer (`refold`),
LiteRT interpreters (`interpreter`) with pre/post-processing per task (`processing`, `detection`), the
simulated analog noise (`noise`), the noisy model (`noisy_model`), BN moments (`moments`), the streaming
calibrator (`stream_calibrator`) and the per-frame calibration step (`device_calibration`), calibration
state on disk (`state`), a latest-job worker (`worker`), class names (`labels`) and the cache (`paths`).
Nothing here imports `edge_cbn.stream`, `edge_cbn.convert` or `edge_cbn.lab`.
"""
from .bundle import Bundle, load_bundle
from .device_calibration import DeviceCalibration
from .interpreter import make_interpreter, run_interpreter
from .noise import PRESETS, make_noise
from .noisy_model import NoisyModel, noise_targets
from .processing import Processor, model_input
from .refold import Refolder
from .stream_calibrator import StreamCalibrator

__all__ = ["Bundle", "DeviceCalibration", "NoisyModel", "PRESETS", "Processor", "Refolder", "StreamCalibrator",
           "load_bundle", "make_interpreter", "make_noise", "model_input", "noise_targets", "run_interpreter"]
