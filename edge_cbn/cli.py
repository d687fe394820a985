"""`edge-cbn` command line.  Each command's module is imported only when that command runs, so the
device commands (`stream`, `bench stream`) start without TensorFlow."""
from __future__ import annotations

import importlib
import os

import click

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) says nothing to a user of these commands.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def noise_options(preset: str, items) -> dict:
    """`--noise-option KEY=VALUE` items for `preset`, parsed and checked (`noise.parse_noise_options`);
    a bad one is a usage error of that option."""
    from .noise import parse_noise_options

    try:
        return parse_noise_options(preset, items)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--noise-option") from None


class LazyGroup(click.Group):
    def __init__(self, *args, lazy: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx, name):
        if name in self._lazy:
            module, attr = self._lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy={
    "convert": "edge_cbn.convert:main",
    "stream": "edge_cbn.stream:main",
    "bench": "edge_cbn.bench:bench",
    "evaluate": "edge_cbn.evaluate:main",
})
@click.version_option(package_name="edge-cbn")
def main():
    """Run CNNs on noisy analog-style hardware at the edge, with Calibrated BatchNorm.

    \b
    edge-cbn stream            live camera/video inference with on-device BN calibration
    edge-cbn models            the model zoo
    edge-cbn convert           build + load weights + fold + export .tflite (workstation)
    edge-cbn evaluate          recovery under noise on natural photos (workstation)
    edge-cbn bench …           benchmarks (models, refuse, stream)
    """


@main.command()
def models():
    """List the registered models: input size, task, parameters, weight file."""
    from . import models as zoo

    click.echo(f"{'name':<20} {'input':>5}  {'task':<14} {'params':>8}  published weights")
    for name in zoo.names():
        spec = zoo.get_spec(name)
        params = zoo.build(name).count_params()
        click.echo(f"{name:<20} {spec.input_size:>5}  {spec.task:<14} {params / 1e6:>7.2f}M  "
                   f"{spec.weights_file or 'none published'} ({spec.weights_format})")
