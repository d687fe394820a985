"""Device side: an exported model running under simulated analog weight noise with re-fusable BN
statistics — the one place that combines `refuse` (statistics into the flatbuffer), `noise` (the chip's
per-frame kernels) and LiteRT interpreters.

Temporal noise needs new kernels for every inference; LiteRT's XNNPACK delegate packs the weights when an
interpreter is built, so a change of weights means a new interpreter (measured in docs/BENCHMARKS.md:
writing the noisy kernels plus building costs more than an invoke of EfficientNet-Lite0).  Two ways:

- `pool=0`, exact: every frame draws its own temporal noise and builds an interpreter for it;
- `pool=K`: K temporal noise states are drawn and built once per statistics update, and each frame uses
  one of them chosen by a seeded draw — per-frame fluctuation at no per-frame cost, from a finite set.
Static noise (no temporal part) and clean models build one interpreter per statistics update.
"""
from __future__ import annotations

import numpy as np

from .refuse import Refuser
from .runtime import io_indices, make_interpreter, run_interpreter

# Temporal-state indices for the pool live far from real frame indices so the two never share draws.
_POOL_FRAME0 = 1 << 40


def noise_layers(bundle) -> dict:
    """{name: (kind, Keras-layout kernel)}: the layers noise applies to (every conv/depthwise/dense)."""
    return {rec.name: (rec.kind, rec.kernel) for rec in bundle.layers}


class NoisyModel:
    """`bundle` under noise chip `chip` (None: clean) with BN statistics that `set_stats` re-fuses."""

    def __init__(self, bundle, chip=None, *, num_threads: int | None = None, pool: int = 0, seed: int = 0):
        self.bundle, self.num_threads, self.pool, self.seed = bundle, num_threads, pool, seed
        self.refuser = Refuser(bundle)
        self._views = {name: slot.w for name, slot in self.refuser.layers.items()}
        self.folded = None if chip is None else chip.folded(
            {name: slot.scale() if slot.rec.bn else None for name, slot in self.refuser.layers.items()})
        self.refuses = 0
        self._io = None
        self._interpreters: list = []
        self._build()

    @property
    def per_frame(self) -> bool:
        """True when every frame gets a different model (temporal noise)."""
        return self.folded is not None and not self.folded.static

    def stats(self) -> dict:
        """The BN statistics currently folded in: {bn: (mean, var)}."""
        return {slot.rec.bn: (slot.mean, slot.var) for slot in self.refuser.layers.values() if slot.rec.bn}

    def set_stats(self, stats: dict) -> None:
        """Re-fuse new BN statistics {bn: (mean, var)} and rebuild what serves the next frames."""
        for name in self.refuser.refuse(stats):
            slot = self.refuser.layers[name]
            if self.folded is not None and slot.rec.bn:
                self.folded.rescale(name, slot.scale())
        self.refuses += 1
        self._build()

    def _build(self) -> None:
        if self.folded is not None and self.per_frame:
            self._interpreters = [self._noisy_interpreter(_POOL_FRAME0 + j) for j in range(self.pool)]
            return
        if self.folded is not None:
            self.folded.write(0, self._views)
        self._interpreters = [self.refuser.interpreter(self.num_threads)]

    def _noisy_interpreter(self, frame: int):
        self.folded.write(frame, self._views)
        return make_interpreter(model_content=self.refuser.model_bytes(), num_threads=self.num_threads)

    def interpreter(self, frame: int):
        """The interpreter that simulates inference number `frame`."""
        if not self.per_frame:
            return self._interpreters[0]
        if self.pool:
            pick = np.random.default_rng([self.seed, frame]).integers(self.pool)
            return self._interpreters[pick]
        return self._noisy_interpreter(frame)

    def run(self, x: np.ndarray, frame: int) -> list[np.ndarray]:
        """Outputs of inference `frame` on input `x`, in the exported (Keras) output order."""
        it = self.interpreter(frame)
        if self._io is None:  # every interpreter of one model has the same tensor indices
            self._io = io_indices(it)
        return run_interpreter(it, *self._io, x)
