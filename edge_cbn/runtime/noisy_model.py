"""An exported model running under simulated analog weight noise with refoldable BN statistics: the
one place that combines `refold` (statistics into the flatbuffer), `noise` (the chip's per-frame
kernels) and LiteRT interpreters.

Temporal noise needs new kernels for every inference, and LiteRT's XNNPACK delegate packs the weights when
an interpreter is built, so a change of weights means a new interpreter.  Two ways:

- `noise_states=0`, exact: every frame draws its own temporal noise and builds an interpreter for it;
- `noise_states=K`: K temporal noise states are drawn and built once per statistics update, and each frame uses
  one of them chosen by a seeded draw: per-frame fluctuation at no per-frame cost, from a finite set.
Static noise (no temporal part) and clean models build one interpreter per statistics update.
"""
from __future__ import annotations

import numpy as np

from .fold import WEIGHT_KINDS
from .interpreter import Delegate, io_indices, make_interpreter, run_interpreter
from .refold import Refolder

# Noise-state indices live far from real frame indices so the two never share draws.
_STATE_FRAME0 = 1 << 40


def noise_targets(bundle) -> dict:
    """{name: (kind, Keras-layout kernel)} of an exported bundle: the layers noise applies to, the argument
    of `Noise.instantiate`.  They are the ones the sidecar's meta "noise_layers" names (chosen at export,
    `convert --noise-layers`), or, when it names none, every conv, depthwise, dense and transposed-conv
    layer; a BatchNorm exported as its own affine (kind "affine") is never one.

    Args:
        bundle: an exported `Bundle` (without its sidecar it has no layers and the result is empty).

    Returns:
        {layer name: (kind, kernel)}: kind "conv", "depthwise", "dense" or "transpose", the unfolded kernel in
        Keras layout (conv HWIO, depthwise HWC1, dense IO, transposed conv HWOI).
    """
    chosen = bundle.meta.get("noise_layers")
    return {rec.name: (rec.kind, rec.kernel) for rec in bundle.layers
            if rec.kind in WEIGHT_KINDS and (chosen is None or rec.name in chosen)}


class NoisyModel:
    """`bundle` under noise chip `chip` (None: clean) with BN statistics that `set_stats` refolds.  A
    bundle without its sidecar runs clean only, with the statistics it was exported with.

    Args:
        bundle: an exported `Bundle`.
        chip: the simulated chip (`Noise.instantiate(noise_targets(bundle))`); None runs the model clean.
        num_threads: LiteRT threads of each interpreter (None: LiteRT's default).
        noise_states: temporal noise only: 0 builds an interpreter for every frame (exact per-frame noise),
            K > 0 draws K noise states per statistics update and serves them in turn.
        seed: seeds which noise state serves a frame.
        build: False makes a builder twin that serves nothing until told (`prepare`, `build_state`).
        delegate: where its interpreters run (`interpreter.open_delegate`: loaded once, shared by all of them,
            twins included); None: XNNPACK on the CPU.

    Raises:
        ValueError: a chip for a bundle without its sidecar.
        BadInput: `delegate` cannot run the model.
        MissingDependency: no TFLite interpreter is installed.
    """

    def __init__(self, bundle, chip=None, *, num_threads: int | None = None, noise_states: int = 0, seed: int = 0,
                 build: bool = True, delegate: Delegate | None = None):
        self.bundle, self.num_threads, self.noise_states, self.seed = bundle, num_threads, noise_states, seed
        self.delegate = delegate
        self.chip = chip
        if chip is not None and not bundle.has_sidecar:
            raise ValueError(f"{bundle.path}: noise needs the model's sidecar (.cbn.npz)")
        # A clean model runs the bundle's own bytes until it gets new statistics: a writable copy (and an
        # interpreter copy of it) only when something is refolded.
        self.refolder = Refolder(bundle) if chip is not None else None
        self.folded = None if chip is None else chip.folded(
            {name: slot.scale() if slot.rec.bn else None for name, slot in self.refolder.layers.items()
             if name in chip.layers})
        self._io = None
        self._interpreters: list = []
        self.patches: list = []  # (byte offset, array) written into every model built (`Refolder.model_bytes`)
        if build:
            self._build()

    @property
    def per_frame(self) -> bool:
        """True when every frame gets a different model (temporal noise)."""
        return self.folded is not None and not self.folded.static

    def stats(self) -> dict:
        """The BN statistics currently folded in: {bn: (mean, var)}.

        Returns:
            {bn name: (mean, var)}, one value per channel each; the bundle's own until new ones are refolded.
        """
        if self.refolder is None:
            return {rec.bn: (rec.mean, rec.var) for rec in self.bundle.layers if rec.bn}
        return {slot.rec.bn: (slot.mean, slot.var) for slot in self.refolder.layers.values() if slot.rec.bn}

    def set_stats(self, stats: dict, probe: np.ndarray | None = None) -> bool:
        """Refold new BN statistics {bn: (mean, var)} and rebuild what serves the next frames.  With
        `probe` (a model input), the new model must first give finite outputs on it; if it does not, the
        previous statistics are put back and False is returned (nothing non-finite is ever served).

        Args:
            stats: {bn name: (mean, var)}, one value per channel each; BNs left out keep their statistics.
            probe: a model input, (1, H, W, 3), to check the new model on; None: no check.

        Returns:
            True when the new statistics serve, False when the probe refused them.

        Raises:
            ValueError: the bundle has no sidecar.
            KeyError: a BN name that is not in the sidecar.
        """
        if not self.bundle.has_sidecar:
            raise ValueError(f"{self.bundle.path}: new statistics need the model's sidecar (.cbn.npz)")
        if self.refolder is None:
            self.refolder = Refolder(self.bundle)
        previous = self.stats()
        self._refold(stats)
        if self.states == 0 and probe is None:
            return True  # exact per-frame noise: every frame builds its own interpreter from the refolder
        first = self._first_interpreter()
        if probe is not None and not self.probe_ok(first, probe):
            del first
            self._refold(previous)
            self._build()
            return False
        self._build(first)
        return True

    def release_file(self) -> None:
        """Let go of the bundle's file (`Refolder.release_file`), for a model made with `build=False` that
        builds every inference anew (`run_fresh`); it cannot serve ready-built interpreters or make a
        `twin` after this.

        Raises:
            ValueError: the model holds ready-built interpreters.
        """
        if self._interpreters:
            raise ValueError("a model with ready-built interpreters still reads its file")
        if self.refolder is None:
            self.refolder = Refolder(self.bundle)
        self.refolder.release_file()
        self.bundle = self.refolder.bundle

    def run_fresh(self, x: np.ndarray, frame: int = 0) -> list[np.ndarray]:
        """`run` on an interpreter built for this inference alone, with `patches` written, whatever the noise
        (the sweep variant's state changes at every frame).

        Args:
            x: the model input, (1, H, W, 3).
            frame: the inference index that draws the chip's temporal noise.

        Returns:
            The output arrays (copies), in the exported order.
        """
        if self.refolder is None:
            self.refolder = Refolder(self.bundle)
        if self.folded is None:
            return self._run(self._make(self.refolder.model_bytes(None, self.patches)), x)
        return self._run(self._noisy_interpreter(frame), x)

    @property
    def states(self) -> int:
        """How many ready-built interpreters serve: the noise states, 1 (static noise, clean), 0 (exact noise)."""
        return self.noise_states if self.per_frame else 1

    def twin(self) -> "NoisyModel":
        """A builder of this model's states for other statistics (`prepare`, then `build_state`), with a
        refolder of its own, so it works beside this model while this one serves.

        Returns:
            A `NoisyModel` of the same bundle, chip, threads, noise states, seed and delegate, built with
            `build=False`.
        """
        return NoisyModel(self.bundle, self.chip, num_threads=self.num_threads, noise_states=self.noise_states, seed=self.seed,
                          build=False, delegate=self.delegate)

    def prepare(self, stats: dict) -> None:
        """Refold `stats` without building anything (`build_state` builds).

        Args:
            stats: {bn name: (mean, var)}, one value per channel each.

        Raises:
            ValueError: the bundle has no sidecar.
            KeyError: a BN name that is not in the sidecar.
        """
        if self.refolder is None:
            self.refolder = Refolder(self.bundle)
        self._refold(stats)

    def build_state(self, j: int):
        """State `j` (0 <= j < max(states, 1)) of the current statistics, built anew and not kept: the
        j-th noise state's temporal draw, the one interpreter, or (exact noise) a probe model.

        Args:
            j: the state's index.

        Returns:
            An allocated LiteRT interpreter.
        """
        if self.folded is not None and self.per_frame:
            return self._noisy_interpreter(_STATE_FRAME0 + j)
        return self._first_interpreter()

    def probe_ok(self, interpreter, probe: np.ndarray) -> bool:
        """True when `interpreter` gives finite outputs on model input `probe`.

        Args:
            interpreter: an interpreter of this model, e.g. from `build_state`.
            probe: a model input, (1, H, W, 3).

        Returns:
            True when every output value is finite.
        """
        return all(np.isfinite(o).all() for o in self._run(interpreter, probe))

    def drop(self, j: int) -> None:
        """Stop serving state `j` (its frames go to the next state) when another state is left to serve.

        Args:
            j: the state's index.
        """
        if self.states > 1 and j < len(self._interpreters):
            self._interpreters[j] = None

    def install(self, j: int, interpreter, stats: dict | None = None) -> None:
        """Serve `interpreter` (from a twin's `build_state(j)`) as state `j`; `stats`, when given, are
        refolded here too (what `stats()` reports, and what exact noise builds from).

        Args:
            j: the state's index.
            interpreter: the interpreter to serve; None only takes `stats`.
            stats: {bn name: (mean, var)} the interpreter was built with; None keeps the current ones.

        Raises:
            ValueError: `stats` for a bundle without its sidecar.
            KeyError: a BN name that is not in the sidecar.
        """
        if stats is not None:
            self.prepare(stats)
        if interpreter is not None and self.states:
            self._interpreters[j] = interpreter

    def _refold(self, stats: dict) -> None:
        for name in self.refolder.refold(stats):
            slot = self.refolder.layers[name]
            if self.folded is not None and slot.rec.bn and name in self.chip.layers:
                self.folded.rescale(name, slot.scale())

    def _first_interpreter(self):
        """The first interpreter of the current statistics (pool state 0 when pooled)."""
        if self.folded is not None and self.per_frame:
            return self._noise_state(0)
        return self._make(self.refolder.model_bytes()) if self.folded is None else self._noisy_interpreter(0)

    def _build(self, first=None) -> None:
        """Build what serves: `first` (from `_first_interpreter`) is used as is when given."""
        if self.refolder is None:
            self._interpreters = [self._make(self.bundle.model_bytes)]
            return
        if not (self.folded is not None and self.per_frame):
            self._interpreters = [first or self._first_interpreter()]
            return
        for j in range(self.noise_states):
            state = first if j == 0 and first is not None else self._noise_state(j)
            if j < len(self._interpreters):
                self._interpreters[j] = state
            else:
                self._interpreters.append(state)

    def _noise_state(self, j: int):
        """Pool state `j` built anew.  The old one is dropped first, so a refold holds no interpreter more
        than the noise states (frames served meanwhile meet a neighbouring state, old or new)."""
        if self.noise_states > 1 and j < len(self._interpreters):
            self._interpreters[j] = None
        return self._noisy_interpreter(_STATE_FRAME0 + j)

    def _noisy_interpreter(self, frame: int):
        """An interpreter of the chip's kernels for inference `frame`, written straight into its bytes (the
        layers that are no noise target, e.g. a BN's own affine, folded as they are)."""
        def write(name, out):
            if name in self.chip.layers:
                self.folded.write(frame, {name: out})
            else:
                self.refolder.layers[name].fold_kernel(out)
        return self._make(self.refolder.model_bytes(write, self.patches))

    def _make(self, model_content: bytes):
        """An interpreter of `model_content` with this model's threads, on its delegate."""
        return make_interpreter(model_content=model_content, num_threads=self.num_threads, delegate=self.delegate)

    def interpreter(self, frame: int):
        """The interpreter that simulates inference number `frame`.

        Args:
            frame: the inference index that draws the chip's temporal noise.

        Returns:
            An allocated LiteRT interpreter: a served one, or (exact noise) one built for this frame.
        """
        if not self.per_frame:
            return self._interpreters[0]
        if self.noise_states:
            pick = int(np.random.default_rng([self.seed, frame]).integers(self.noise_states))
            states = self._interpreters
            return states[pick] if states[pick] is not None else states[(pick + 1) % len(states)]
        return self._noisy_interpreter(frame)

    def run(self, x: np.ndarray, frame: int = 0) -> list[np.ndarray]:
        """Outputs of inference `frame` on input `x`, in the exported (Keras) output order.

        Args:
            x: the model input, (1, H, W, 3), float32 or (a raw-input model, `Bundle.raw_input`) uint8.
            frame: the inference index that draws the chip's temporal noise.

        Returns:
            The output arrays (copies); a calibration variant's last one is its moments vector.

        Raises:
            ValueError: `x` of another shape or dtype than the model's input (LiteRT).
        """
        return self._run(self.interpreter(frame), x)

    def _run(self, it, x: np.ndarray) -> list[np.ndarray]:
        if self._io is None:  # every interpreter of one model has the same tensor indices
            self._io = io_indices(it)
        return run_interpreter(it, *self._io, x)
