"""`edge-cbn` command line: the root group.  Each command's module is imported only when that command
runs, so the device commands (`stream`, `bench stream`) start without TensorFlow."""
from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from .runtime.errors import BadInput, MissingDependency


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

    def main(self, args=None, standalone_mode=True, **kwargs):
        """Bad input is one line on stderr and exit status 1 (usage errors: click's, status 2); so is an
        unexpected error, which names itself as such.  `--debug` anywhere restores the traceback."""
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args or os.environ.get("EDGE_CBN_DEBUG", "") not in ("", "0")
        args = [a for a in args if a != "--debug"]
        if debug:  # for the parts that decide what to show below the CLI (e.g. FFmpeg's log)
            os.environ["EDGE_CBN_DEBUG"] = "1"
        if not standalone_mode:
            return super().main(args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - one line for a bad input and for a bug alike
            if debug:
                raise
            sys.exit(one_line_error(e))
        sys.exit(rv if isinstance(rv, int) else 0)


# The optional packages a command may need, and what installs each (pyproject's extras).
OPTIONAL_PACKAGES = {
    "ray": "pip install 'edge-cbn[cluster]'",
    "tensorflow": "pip install 'edge-cbn[convert]'",
    "keras": "pip install 'edge-cbn[convert]'",
    "pycocotools": "pip install 'edge-cbn[eval]'",
    "matplotlib": "pip install 'edge-cbn[eval]'",
    "PIL": "pip install 'edge-cbn[eval]'",
    "skimage": "pip install 'edge-cbn[data]'",
    "sklearn": "pip install 'edge-cbn[data]'",
    "torch": "pip install torch (the reference runs only)",
}


def missing_dependency(e: Exception) -> MissingDependency | None:
    """`e` as the missing optional package it reports, or None."""
    if isinstance(e, MissingDependency):
        return e
    name = getattr(e, "name", None) or ""
    top = name.split(".")[0]
    if isinstance(e, ModuleNotFoundError) and top in OPTIONAL_PACKAGES:
        return MissingDependency(top, OPTIONAL_PACKAGES[top])
    return None


def one_line_error(e: Exception) -> int:
    """Print `e` as one line on stderr; the exit status for it (1)."""
    missing = missing_dependency(e)
    if isinstance(e, BadInput) or missing is not None:
        click.echo(f"Error: {missing or e}", err=True)  # the form of click's own errors
    else:
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" at {os.path.basename(where.filename)}:{where.lineno}" if where else ""
        click.echo(f"Error: internal error: {type(e).__name__}: {e}{at} (--debug shows the traceback)",
                   err=True)
    return 1


@click.group(cls=LazyGroup, lazy={
    "convert": "edge_cbn.convert.command:main",
    "stream": "edge_cbn.stream.command:main",
    "bench": "edge_cbn.lab.bench.command:bench",
    "evaluate": "edge_cbn.lab.evaluate.command:main",
    "divergence": "edge_cbn.lab.divergence:main",
    "plot": "edge_cbn.lab.plot:main",
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
    edge-cbn evaluate TASK     top-1 / mAP@0.5 / mIoU on ImageNet, COCO or VOC data (the paper's tables)
    edge-cbn divergence        per-BN-layer KL/JS of noisy vs clean activations, calibrated or not (Fig. 1)
    edge-cbn plot LOG.jsonl    charts of a stream's --log: agreement, fps, calibration (PNG)
    edge-cbn bench …           benchmarks (models, refold, stream)

    An input edge-cbn cannot use is one line on stderr and exit status 1 (a usage error: status 2);
    --debug anywhere on the line (or EDGE_CBN_DEBUG=1) shows the traceback instead.
    """


if __name__ == "__main__":  # python -m edge_cbn.cli: the same as the edge-cbn script
    main()
