"""Click options that several commands share, declared once: the model, the LiteRT threads, the
simulated noise (`--noise`, `--eta`, `--seed`, `--noise-option`, and `evaluate`'s `PRESET:ETA,…` sweeps)
and `--verbose` for TensorFlow's own log."""
from __future__ import annotations

import os

import click

from .runtime import images
from .runtime.noise import ETA_MAX, PRESETS, parse_noise_options

NOISE_OPTION_HELP = ("Override an option of the --noise preset, repeatable, e.g. t_granularity=weight "
                     "(docs/NOISE.md).")


def model_option(help: str = "Registered name or exported .tflite (default: efficientnet_lite0)."):
    return click.option("--model", default=None, help=help)


def num_threads_option(default: int | None = None, help: str = "LiteRT threads."):
    return click.option("--num-threads", type=int, default=default, show_default=default or
                        "number of CPUs", help=help)


def noise_flags(*, default: str = "none", seed: bool = True, noise_option: bool = True,
                noise_help: str = "Simulated analog weight noise preset (docs/NOISE.md)."):
    """`--noise PRESET`, `--eta` and, unless turned off, `--seed` and `--noise-option KEY=VALUE`."""
    decorators = [
        click.option("--noise", type=click.Choice(PRESETS), default=default, show_default=True, help=noise_help),
        click.option("--eta", type=NOISE_LEVEL, default=0.05, show_default=True,
                     help=f"Noise level eta0, 0 to {ETA_MAX:g} (docs/NOISE.md)."),
    ]
    if seed:
        decorators.append(click.option("--seed", type=int, default=0, show_default=True,
                                       help="Chip seed (the simulated device instance; same seed = same chip)."))
    if noise_option:
        decorators.append(noise_option_flag())
    return _apply(decorators)


def noise_option_flag(help: str = NOISE_OPTION_HELP):
    return click.option("--noise-option", "noise_option", multiple=True, metavar="KEY=VALUE", help=help)


class RenamedOption(click.Option):
    """An option whose `old` spellings still parse (scripts and service files written before a rename)
    but are not shown in --help."""

    def __init__(self, param_decls, old=(), **attrs):
        super().__init__([*param_decls, *old], **attrs)
        self.old = set(old)

    def get_help_record(self, ctx):
        shown, self.opts = self.opts, [o for o in self.opts if o not in self.old]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def refold_every_option(default: int, help: str):
    """`--refold-every N` (formerly `--refuse-every`)."""
    return click.option("--refold-every", "refold_every", cls=RenamedOption, old=["--refuse-every"],
                        type=click.IntRange(1), default=default, show_default=True, metavar="N", help=help)


def noise_states_option(default: int, help: str, old: str):
    """`--noise-states K` (the temporal noise states a noisy model serves in turn), formerly `old`."""
    return click.option("--noise-states", "noise_states", cls=RenamedOption, old=[old], type=click.IntRange(0),
                        default=default, show_default=True, metavar="K", help=help)


def _apply(decorators):
    def wrap(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return wrap


def max_image_pixels_option():
    """`--max-image-pixels N`: the pixel bound of image decoding (`runtime.images`), passed on through the
    environment, which worker processes inherit."""
    def set_bound(ctx, param, value):
        if value is not None:
            os.environ[images.ENV] = str(value)

    return click.option("--max-image-pixels", type=click.IntRange(1), default=None, is_eager=True,
                        expose_value=False, callback=set_bound, metavar="N",
                        help=f"Images over N pixels are decoded reduced (JPEG) or refused [default: "
                             f"{images.MAX_PIXELS}, 8000x6000: a few small files cannot take gigabytes].")


def verbose_option():
    """`--verbose`: TensorFlow's own start-up and conversion log, silenced otherwise (it is eager, so it
    acts before the command imports TensorFlow)."""
    def let_through(ctx, param, value):
        if value:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"

    return click.option("--verbose", is_flag=True, is_eager=True, expose_value=False, callback=let_through,
                        help="Show TensorFlow's own log (start-up notices, conversion warnings).")


def noise_options(preset: str, items) -> dict:
    """`--noise-option KEY=VALUE` items for `preset`, parsed and checked; a bad one is a usage error of
    that option."""
    try:
        return parse_noise_options(preset, items)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--noise-option") from None


class NonNegativeFloat(click.ParamType):
    """A finite float >= 0 (click's FloatRange lets NaN and infinity through)."""
    name = "float"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not 0 <= number < float("inf"):
            self.fail(f"{value!r} must be finite and >= 0", param, ctx)
        return number


class NoiseLevel(NonNegativeFloat):
    """A noise level eta0: a finite float in [0, ETA_MAX] (beyond, weights and activations overflow)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number > ETA_MAX:
            self.fail(f"{value!r} is above {ETA_MAX:g}: the noise would be more than {ETA_MAX:g} times the "
                      "weights", param, ctx)
        return number


NOISE_LEVEL = NoiseLevel()


class IntList(click.ParamType):
    """Comma-separated integers, at least one, each >= `min` (`--seeds 0,1,2`, `--checkpoints 16,32`)."""
    name = "N[,N…]"

    def __init__(self, min: int = 0):
        self.min = min

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated integers", param, ctx)
        if not numbers or min(numbers) < self.min:
            self.fail(f"{value!r}: expected comma-separated integers >= {self.min}", param, ctx)
        return numbers


class NoiseSweep(click.ParamType):
    """`PRESET:ETA[,ETA…]` -> (preset, [eta, …]): a noise preset and the levels to sweep."""
    name = "PRESET:ETA[,ETA…]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        preset, _, etas = str(value).partition(":")
        if preset not in PRESETS:
            self.fail(f"unknown preset {preset!r} (one of {PRESETS})", param, ctx)
        return preset, [NOISE_LEVEL.convert(eta, param, ctx) for eta in etas.split(",")]
