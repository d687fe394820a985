"""The noise presets as small typed classes, one per physical model (in the manner of aihwkit's noise
models): `Relative(eta=0.05)` is `--noise relative --eta 0.05`.  Each names its formula and source; the
draws themselves are `noise.make_noise`'s (docs/NOISE.md), so a class and the preset of the same name
give the same chip bit for bit.  Device side: numpy only.

    from edge_cbn import Relative
    chip = Relative(eta=0.05).chip(bundle, seed=0)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from .noise import Chip, Noise, PCMOptions, make_noise
from .noisy_model import noise_targets

Granularity = Literal["weight", "channel", "tensor"]


@dataclass(frozen=True)
class NoiseModel:
    """A simulated analog weight noise model at level `eta` (η0).  Subclasses add their options as
    typed fields with the defaults of docs/NOISE.md.

    Attributes:
        eta: η0, the noise level (0: no noise).
    """
    preset: ClassVar[str] = "none"
    eta: float = 0.0

    def options(self) -> dict:
        """The preset's options (`--noise-option KEY=VALUE`) as set on this instance.

        Returns:
            {field name: value} of every field but `eta`: the `make_noise` keywords of this model.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "eta"}

    def noise(self, seed: int = 0, *, temporal: bool = True) -> Noise:
        """The seeded noise model (`noise.make_noise`).

        Args:
            seed: the chip's seed: the same seed is the same chip on every machine.
            temporal: False keeps only the per-instance part (every frame sees the same weights).

        Returns:
            The `noise.Noise`; `.instantiate(noise_targets(bundle))` makes a chip of it.

        Raises:
            ValueError: a level that is not finite or out of its range, an unknown granularity.
        """
        return make_noise(self.preset, self.eta, seed, temporal=temporal, **self.options())

    def chip(self, bundle, seed: int = 0) -> Chip:
        """One simulated noisy chip for every conv, depthwise and dense layer of an exported `bundle`.

        Args:
            bundle: an exported `Bundle` with its sidecar (without one there are no layers to make noisy).
            seed: the chip's seed: the same seed is the same chip on every machine.

        Returns:
            The `noise.Chip`, for `NoisyModel(bundle, chip)`.

        Raises:
            ValueError: a level that is not finite or out of its range, an unknown granularity.
        """
        return self.noise(seed).instantiate(noise_targets(bundle))

    @property
    def text(self) -> str:
        """The command-line spelling, e.g. `relative:0.05`."""
        return f"{self.preset}:{self.eta:g}"


@dataclass(frozen=True)
class FactorModel(NoiseModel):
    """A per-chip factor ε_S and a per-inference factor N_T ~ N(η0, (temporal_level · η0)²) on the weights.

    Attributes:
        temporal_level: the temporal factor's spread relative to η0 (the paper's "20 % temporal fluctuation").
        s_granularity, t_granularity: one draw of ε_S / N_T per weight, output channel or tensor.
    """
    temporal_level: float = 0.2
    s_granularity: Granularity = "weight"
    t_granularity: Granularity = "tensor"


@dataclass(frozen=True)
class Paper(FactorModel):
    """Eq. 2 of Tsai et al., *Calibrated BatchNorm*, read literally:
    W_noisy = W + W · N_T · N_S, N_S ~ N(η0, σ_S²) once per chip, N_T ~ N(η0, σ_T²) per inference,
    σ_T = temporal_level · η0.

    Attributes:
        eta: η0, the mean of both factors.
        spatial_level: σ_S = spatial_level · η0 (`spatial_reading="relative"`) or spatial_level ("absolute",
            "unit-mean").
        spatial_reading: "relative" or "absolute" (the text literally says σ_S = 0.1), or "unit-mean":
            N_S ~ N(1, σ_S²), the paper's η0 scale, equal to the "relative" reading at √η0 (docs/NOISE.md).
        temporal_level, s_granularity, t_granularity: as in `FactorModel`.
    """
    preset: ClassVar[str] = "paper"
    eta: float = 0.3
    spatial_level: float = 0.1
    spatial_reading: Literal["relative", "absolute", "unit-mean"] = "relative"


@dataclass(frozen=True)
class Relative(FactorModel):
    """Zero-mean multiplicative weight noise: W_noisy = W · (1 + N_T · ε_S), ε_S ~ N(0, 1) per weight
    once per chip, N_T as in `FactorModel`: a relative weight std of about η0.

    Attributes:
        eta: η0, the relative standard deviation of the weights.
        temporal_level, s_granularity, t_granularity: as in `FactorModel`.
    """
    preset: ClassVar[str] = "relative"
    eta: float = 0.05


@dataclass(frozen=True)
class AdditiveMax(FactorModel):
    """Additive noise scaled by the layer's largest weight (after Joshi et al., *Accurate deep neural
    network inference using computational phase-change memory*, Nat. Commun. 2020):
    W_noisy = W + N_T · max|W| · ε_S, ε_S ~ N(0, 1) per weight once per chip, N_T as in `FactorModel`.

    Attributes:
        eta: η0, the noise std as a fraction of max|W|.
        temporal_level, s_granularity, t_granularity: as in `FactorModel`.
    """
    preset: ClassVar[str] = "additive-max"
    eta: float = 0.02


@dataclass(frozen=True)
class PCM(PCMOptions, NoiseModel):
    """Phase-change memory, after IBM aihwkit's `PCMLikeNoiseModel` (Nandakumar et al., IEDM 2019): per
    layer the weights map to a device pair g± = clip(±W · g_max / max|W|, 0, g_max) µS; programming noise
    and a drift exponent are drawn once per chip, g_d = g_p · (t/t0)^-ν at t = t_inference + t0, and 1/f
    read noise per inference.  Formulas: docs/NOISE.md, `noise.PCMNoise`.

    Attributes:
        eta: scales the programming and read noise (1 = aihwkit's defaults).
        t_granularity: one read-noise draw per weight (default), output channel or tensor.
        t_inference: seconds since programming (3600).
        t0, t_read: the drift reference time (20 s) and the read time (250 ns).
        g_max: the largest conductance (25 µS).
        prog_coeff: the programming noise's polynomial in g/g_max (µS).
        drift_scale: multiplies the drift exponent ν (1; 0: no drift).
    """
    preset: ClassVar[str] = "pcm"
    eta: float = 1.0


NOISE_MODELS = {cls.preset: cls for cls in (Paper, Relative, AdditiveMax, PCM)}


def noise_model(preset: str, eta: float, **options) -> NoiseModel | None:
    """The class instance of a preset name (`--noise`), None for "none".

    Args:
        preset: "none", "paper", "relative", "additive-max" or "pcm".
        eta: η0, the noise level.
        **options: the class's other fields (`--noise-option KEY=VALUE`), e.g. temporal_level=0.2.

    Returns:
        A `Paper`, `Relative`, `AdditiveMax` or `PCM`; None for "none".

    Raises:
        ValueError: an unknown preset or option.
    """
    if preset == "none":
        return None
    if preset not in NOISE_MODELS:
        raise ValueError(f"unknown noise preset {preset!r}; expected one of {['none', *NOISE_MODELS]}")
    cls = NOISE_MODELS[preset]
    unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for noise preset {preset!r}")
    return cls(eta=eta, **options)
