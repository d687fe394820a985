"""`edge-cbn` command line: the root group.  Each command's module is imported only when that command
runs, so the device commands (`stream`, `bench stream`) start without TensorFlow."""
from __future__ import annotations

import importlib

import click


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
    "convert": "edge_cbn.convert.command:main",
    "stream": "edge_cbn.stream.command:main",
    "bench": "edge_cbn.lab.bench:bench",
    "evaluate": "edge_cbn.lab.evaluate:main",
    "models": "edge_cbn.convert.command:models",
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
