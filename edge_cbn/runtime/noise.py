"""Seeded simulated analog weight noise (device side: numpy only).

Every preset reduces, once a chip is instantiated, to the same per-layer form

    W_noisy(frame) = base + xi(frame) * dev

`base` and `dev` are per-instance arrays ("the chip"), drawn once from (seed, layer name); `xi` is a
standard normal drawn per inference from (seed, layer name, frame index), one per tensor, per output
channel or per weight (`t_granularity`).  A temporal factor N_T ~ N(m, sd^2) multiplying a direction D is
written `base = W + m*D`, `dev = sd*D`, so all presets share the per-frame code.

Layers: `{name: (kind, kernel)}` with kind "conv" | "depthwise" | "dense" | "transpose" and the kernel in
Keras layout (conv HWIO, depthwise HWC1, dense IO, transposed conv HWOI).  Internally everything (draws included) is in TFLite layout
(conv OHWI, depthwise 1HWC, dense OI, see `edge_cbn.runtime.fold`), so the on-device fast path writes straight
into the flatbuffer without a transpose, and the Keras path gives the same numbers transposed.

Random streams: `numpy.random.default_rng([seed, crc32(name), stream, frame])` — independent of dict
order and of which other layers exist.  Offline at batch size > 1, pass the batch index as `frame`.

Folding: noise acts on the unfolded kernel W; the TFLite model holds W_f = W * s.  Since s is per output
channel, fold(base + xi*dev) = s*base + xi*(s*dev) exactly (up to float32 rounding), which is what
`FoldedChip` computes.  See docs/NOISE.md for every preset's formula and defaults.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional

import numpy as np

from .fold import WEIGHT_KINDS, channel_shape, fold_kernel, out_channels, to_keras, to_tflite

PRESETS = ("none", "paper", "relative", "additive-max", "pcm")
GRANULARITIES = ("weight", "channel", "tensor")
# The `paper` preset's readings of eq. 2's spatial factor N_S: mean eta0 with sd level*eta0 ("relative") or
# level ("absolute"), or mean 1 with sd level ("unit-mean", the paper's eta0 scale; docs/NOISE.md).
SPATIAL_READINGS = ("relative", "absolute", "unit-mean")
# eta0 at most this: at 10 the noise is ten times the weights (relative) or aihwkit's PCM noise tenfold, and
# far beyond it float32 weights and activations overflow to Inf and NaN.
ETA_MAX = 10.0
# The numeric options' ranges (low, high, whether low itself is allowed); every value must also be finite.
OPTION_RANGES = {"temporal_level": (0.0, None, True), "spatial_level": (0.0, None, True),
                 "t_inference": (0.0, None, True), "t0": (0.0, None, False), "t_read": (0.0, None, False),
                 "g_max": (0.0, None, False), "drift_scale": (0.0, None, True)}
_SPATIAL, _TEMPORAL = 0, 1


def _rng(seed: int, name: str, stream: int, frame: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), stream, frame])


def _normal(rng, granularity: str, kind: str, shape: tuple, out=None):
    """Standard normal(s) broadcastable to a TFLite-layout kernel of `shape`: a Python float (tensor),
    a channel-shaped float32 array (channel) or a float32 array of `shape` (weight; filled into `out`
    when given)."""
    if granularity == "tensor":
        return rng.standard_normal()
    if granularity == "channel":
        n = out_channels(kind, shape)
        return rng.standard_normal(n, dtype=np.float32).reshape(channel_shape(kind, n))
    if granularity == "weight":
        return rng.standard_normal(None if out is not None else shape, dtype=np.float32, out=out)
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


class Layer(NamedTuple):
    """One instantiated layer: float32 arrays in TFLite layout; `dev` is None when static."""
    kind: str
    base: np.ndarray
    dev: Optional[np.ndarray]
    multiplier: int  # depthwise depth multiplier (1 otherwise), to get the Keras layout back


@dataclass(frozen=True)
class Noise:
    """Preset `none`: W_noisy = W.  Subclasses override `spatial`.

    `temporal=False` (static mode) replaces xi by its mean 0, i.e. N_T by its mean: only the
    per-instance part is simulated and every frame sees the same kernels."""
    preset: str
    eta: float
    seed: int
    temporal: bool = True
    t_granularity: str = "tensor"

    def __post_init__(self):
        for g in (self.t_granularity, getattr(self, "s_granularity", "weight")):
            if g not in GRANULARITIES:
                raise ValueError(f"unknown granularity {g!r}; expected one of {GRANULARITIES}")

    def spatial(self, kind: str, w: np.ndarray, rng: np.random.Generator):
        """Per-instance (base, dev) for kernel `w` (float64, TFLite layout); dev None = no noise."""
        return w, None

    def instantiate(self, layers: Mapping[str, tuple]) -> "Chip":
        chip = {}
        for name, (kind, kernel) in layers.items():
            if kind not in WEIGHT_KINDS:
                raise ValueError(f"{name}: layer kind {kind!r} holds no weight noise can act on; expected one of "
                                 f"{WEIGHT_KINDS}")
            kernel = np.asarray(kernel)
            w = np.ascontiguousarray(to_tflite(kind, kernel), np.float64)
            base, dev = self.spatial(kind, w, _rng(self.seed, name, _SPATIAL))
            dev = None if dev is None or not self.temporal else dev.astype(np.float32)
            multiplier = kernel.shape[-1] if kind == "depthwise" else 1
            chip[name] = Layer(kind, base.astype(np.float32), dev, multiplier)
        return Chip(self, chip)


@dataclass(frozen=True)
class FactorNoise(Noise):
    """W_noisy = W + N_T * R * N_S with N_S ~ N(s_mean, s_std^2) drawn once per instance (at
    `s_granularity`), N_T ~ N(t_mean, t_std^2) drawn per inference (at `t_granularity`), and
    R = W (`ref="weight"`: presets `paper`, `relative`) or R = max|W| of the layer (`ref="max"`:
    `additive-max`)."""
    s_mean: float = 0.0
    s_std: float = 1.0
    s_granularity: str = "weight"
    t_mean: float = 0.0
    t_std: float = 0.0
    ref: str = "weight"

    def spatial(self, kind, w, rng):
        n_s = self.s_mean + self.s_std * np.asarray(_normal(rng, self.s_granularity, kind, w.shape))
        d = (w if self.ref == "weight" else np.abs(w).max()) * n_s
        return w + self.t_mean * d, self.t_std * d


@dataclass(frozen=True)
class PCMOptions:
    """The PCM model's options, with aihwkit's defaults (`PCMNoise`, and `noise_models.PCM`)."""
    t_granularity: str = "weight"
    t_inference: float = 3600.0
    t0: float = 20.0
    t_read: float = 250e-9
    g_max: float = 25.0
    prog_coeff: tuple = (0.26348, 1.9650, -1.1731)
    drift_scale: float = 1.0


@dataclass(frozen=True)
class PCMNoise(PCMOptions, Noise):
    """PCM-like noise after IBM aihwkit's `PCMLikeNoiseModel` (single device pair per weight).

    Per layer, weights map to conductances g± = clip(±W * g_max / max|W|, 0, g_max) (µS).  Per
    instance, per device: programming noise g_p = max(g + eta * sig_p(g) * eps, 0) with
    sig_p = (c0 + c1 g/g_max + c2 (g/g_max)^2) * g_max/25; drift exponent
    nu = drift_scale * |mu(g) + sd(g) * eps'|, mu = clip(-0.0155 ln(g/g_max) + 0.0244, 0.049, 0.1),
    sd = clip(-0.0125 ln(g/g_max) - 0.0059, 0.008, 0.045); drift g_d = g_p * (t/t0)^(-nu) with
    t = t_inference + t0.  Per frame: 1/f read noise g_d * (1 + eta * q(g_p) * sqrt(ln((t + t_read) /
    (2 t_read))) * xi), q = min(0.0088 / max((g_p/g_max)^0.65, 1e-3), 0.2).  The two devices' read
    noises are merged into one normal per weight with the pair's combined standard deviation (equal in
    distribution), and the read step's clamp at 0 is dropped, so the per-frame term stays one
    multiply-add.  No drift compensation: drift shrinks the weights (≈ x0.77 after an hour), which
    calibrated BN absorbs."""

    def spatial(self, kind, w, rng):
        ratio = self.g_max / max(float(np.abs(w).max()), 1e-7)
        g = np.clip(np.stack([w, -w]) * ratio, 0.0, self.g_max)  # target conductances (g+, g-)
        rel = g / self.g_max
        c0, c1, c2 = self.prog_coeff
        sig_p = (c0 + c1 * rel + c2 * rel**2) * (self.g_max / 25.0)
        g_p = np.maximum(g + self.eta * sig_p * rng.standard_normal(g.shape), 0.0)
        log_rel = np.log(np.maximum(rel, 1e-7))
        mu = np.clip(-0.0155 * log_rel + 0.0244, 0.049, 0.1)
        sd = np.clip(-0.0125 * log_rel - 0.0059, 0.008, 0.045)
        nu = self.drift_scale * np.abs(mu + sd * rng.standard_normal(g.shape))
        t = self.t_inference + self.t0
        g_d = g_p * (t / self.t0) ** -nu if t > self.t0 else g_p
        q = np.minimum(0.0088 / np.maximum((g_p / self.g_max) ** 0.65, 1e-3), 0.2)
        sig_r = self.eta * q * math.sqrt(math.log((t + self.t_read) / (2 * self.t_read)))
        return (g_d[0] - g_d[1]) / ratio, np.hypot(*(g_d * sig_r)) / ratio


# The options make_noise takes per preset, with their defaults (the rest of each model's fields is what
# makes it that preset); `--noise-option KEY=VALUE` sets all but the tuple-valued ones.
_FACTOR_OPTIONS = {"temporal_level": 0.2, "s_granularity": "weight", "t_granularity": "tensor"}
PRESET_OPTIONS = {
    "none": {},
    "paper": {**_FACTOR_OPTIONS, "spatial_level": 0.1, "spatial_reading": "relative"},
    "relative": _FACTOR_OPTIONS,
    "additive-max": _FACTOR_OPTIONS,
    "pcm": {f.name: f.default for f in dataclasses.fields(PCMOptions)},
}


def parse_noise_options(preset: str, items) -> dict:
    """["KEY=VALUE", ...] (the CLIs' repeatable --noise-option) -> keyword options of `make_noise`,
    each VALUE converted to the type of the option's default."""
    defaults = {k: v for k, v in PRESET_OPTIONS.get(preset, {}).items() if not isinstance(v, tuple)}
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in defaults:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {sorted(defaults) or 'none'} "
                             f"for preset {preset!r}")
        try:
            options[key] = type(defaults[key])(value.strip())
        except ValueError:
            raise ValueError(f"{item!r}: {key} takes a {type(defaults[key]).__name__}") from None
    make_noise(preset, **options)  # values too (a granularity, a reading), before any long run starts
    return options


def make_noise(preset: str, eta: float = 0.0, seed: int = 0, *, temporal: bool = True,
               **options) -> Noise:
    """Noise model for a `--noise` preset name; `options` override the preset's defaults in
    `PRESET_OPTIONS` (docs/NOISE.md): for paper temporal_level (sigma_T = level*eta), spatial_level and
    spatial_reading ("relative": sigma_S = level*eta, "absolute": sigma_S = level), s_granularity and
    t_granularity; relative and additive-max the same without the spatial ones; pcm t_inference (s),
    t0, t_read, g_max, drift_scale, t_granularity (eta scales the programming and read noise
    amplitudes; eta=1 gives aihwkit's defaults).

    Args:
        preset: one of `PRESETS`: "none", "paper", "relative", "additive-max", "pcm".
        eta: the noise level η0, a finite number in [0, ETA_MAX].
        seed: the chip's seed: the same seed gives the same chip on every machine.
        temporal: False (static mode) keeps only the per-instance part: every frame sees the same kernels.
        **options: the preset's options above, each overriding its default.

    Returns:
        The `Noise` (a frozen dataclass); `.instantiate(noise_targets(bundle))` makes a `Chip` of it.

    Raises:
        ValueError: an unknown preset or option, a level that is not finite or out of its range
            (`check_levels`), an unknown granularity or spatial_reading.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown noise preset {preset!r}; expected one of {PRESETS}")
    unknown = set(options) - set(PRESET_OPTIONS[preset])
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for noise preset {preset!r}; "
                         f"expected some of {sorted(PRESET_OPTIONS[preset])}")
    check_levels(eta, options)
    common = dict(preset=preset, eta=float(eta), seed=int(seed), temporal=temporal)
    if preset == "none":
        return Noise(**common)
    if preset == "pcm":
        return PCMNoise(**common, **options)
    o = {**PRESET_OPTIONS[preset], **options}
    if preset == "paper":
        if o["spatial_reading"] not in SPATIAL_READINGS:
            raise ValueError(f"spatial_reading must be one of {SPATIAL_READINGS}, not {o['spatial_reading']!r}")
        if o["spatial_reading"] == "unit-mean":  # N_S ~ N(1, level^2): the paper's eta0 scale (docs/NOISE.md)
            factors = dict(s_mean=1.0, s_std=o["spatial_level"], ref="weight")
        else:
            s_std = o["spatial_level"] * eta if o["spatial_reading"] == "relative" else o["spatial_level"]
            factors = dict(s_mean=eta, s_std=s_std, ref="weight")
    else:
        factors = dict(s_mean=0.0, s_std=1.0, ref="weight" if preset == "relative" else "max")
    return FactorNoise(**common, **factors, t_mean=eta, t_std=o["temporal_level"] * eta,
                       s_granularity=o["s_granularity"], t_granularity=o["t_granularity"])


def check_levels(eta: float, options: Mapping) -> None:
    """`ValueError` naming the value unless eta is finite and in [0, ETA_MAX] and every numeric option
    finite and in its `OPTION_RANGES` range: a NaN, Inf or huge level would serve non-finite outputs."""
    if not 0 <= _number(eta) <= ETA_MAX:
        raise ValueError(f"eta {eta!r} must be a finite number in [0, {ETA_MAX:g}]")
    for key, value in options.items():
        if key not in OPTION_RANGES:
            continue
        low, high, low_ok = OPTION_RANGES[key]
        number = _number(value)
        if not ((number >= low if low_ok else number > low) and (high is None or number <= high)):
            bound = f">= {low:g}" if low_ok else f"> {low:g}"
            raise ValueError(f"{key}={value!r} must be a finite number {bound}")


def _number(value) -> float:
    """`value` as a float, NaN (which fails every range check) when it is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


class Chip:
    """One noisy device instance: per-layer `Layer`s (TFLite layout) plus the noise model."""

    def __init__(self, noise: Noise, layers: dict):
        self.noise = noise
        self.layers = layers

    @property
    def static(self) -> bool:
        """True when no layer changes from frame to frame."""
        return all(layer.dev is None for layer in self.layers.values())

    def xi(self, name: str, frame: int, out=None):
        """The standard-normal temporal draw of layer `name` for inference `frame` (TFLite layout)."""
        rng = _rng(self.noise.seed, name, _TEMPORAL, frame)
        return _normal(rng, self.noise.t_granularity, self.layers[name].kind,
                       self.layers[name].base.shape, out)

    def kernel(self, name: str, frame: int) -> np.ndarray:
        """Noisy unfolded kernel of layer `name` for inference `frame`, Keras layout, float32."""
        layer = self.layers[name]
        k = layer.base if layer.dev is None else layer.base + self.xi(name, frame) * layer.dev
        return np.array(to_keras(layer.kind, k, layer.multiplier), np.float32)

    def perturb(self, frame: int) -> dict:
        """{name: noisy kernel (Keras layout)} for inference `frame` (the Keras/offline path)."""
        return {name: self.kernel(name, frame) for name in self.layers}

    def folded(self, scales: Mapping[str, Optional[np.ndarray]]) -> "FoldedChip":
        """Fast path over the layers in `scales` ({name: per-output-channel BN scale s, or None for
        a layer without BN})."""
        return FoldedChip(self, scales)


class FoldedChip:
    """The chip under per-output-channel BN scales s: `write` produces one frame's noisy folded kernels
    (s*dev)*xi + s*base, the same float32 operations in the same order as folding precomputed s*base and
    s*dev, but folded on the fly through one scratch array of the largest layer's size, so every model
    built on the chip shares its arrays instead of holding a folded copy of them (Lite0: 37 MB each)."""

    def __init__(self, chip: Chip, scales: Mapping[str, Optional[np.ndarray]]):
        self.chip = chip
        self._scales: dict[str, Optional[np.ndarray]] = {}
        for name, s in scales.items():
            self.rescale(name, s)
        self._scratch = np.empty(max((layer.base.size for layer in chip.layers.values()), default=0), np.float32)

    @property
    def static(self) -> bool:
        """True when `write` gives the same kernels for every frame (write once, then skip)."""
        return all(self.chip.layers[name].dev is None for name in self._scales)

    def rescale(self, name: str, s: Optional[np.ndarray]) -> None:
        """Layer `name` is folded with the new BN scale `s` (None: no BN) from the next `write` on."""
        self._scales[name] = None if s is None else np.array(s, np.float32)

    def write(self, frame: int, out: Mapping[str, np.ndarray]) -> None:
        """Write the noisy folded kernels of inference `frame` into `out` ({name: writable float32
        C-contiguous view, e.g. of the flatbuffer's buffer}, any shape of the right size)."""
        for name, view in out.items():
            layer, s = self.chip.layers[name], self._scales[name]
            if view.dtype != np.float32 or not view.flags.c_contiguous or view.size != layer.base.size:
                raise ValueError(f"{name}: need a C-contiguous float32 view of {layer.base.size} elements")
            o = view.reshape(layer.base.shape)
            scratch = self._scratch[:layer.base.size].reshape(layer.base.shape)
            if layer.dev is None:
                self._fold(layer, s, layer.base, o)
                continue
            xi = self.chip.xi(name, frame, out=scratch if self.chip.noise.t_granularity == "weight" else None)
            self._fold(layer, s, layer.dev, o)
            np.multiply(o, xi, out=o)
            np.add(o, self._fold(layer, s, layer.base, scratch), out=o)

    @staticmethod
    def _fold(layer: Layer, s, arr: np.ndarray, out: np.ndarray) -> np.ndarray:
        """`arr` folded with scale `s` (None: as is) into `out`."""
        if s is None:
            np.copyto(out, arr)
            return out
        return fold_kernel(layer.kind, arr, s, out=out)
