"""Refold BatchNorm statistics (and optionally perturbed kernels) into an exported `.tflite` on the
device, without TensorFlow and without reconverting ("refold" in the CLI and docs).

`Refolder` locates every folded kernel and bias buffer once (through the `tflite` schema package) and
keeps each layer's current unfolded kernel and statistics.  `model_bytes()` then assembles a new model in
one pass: the bundle's bytes between those buffers, and in them the folding arithmetic of
`edge_cbn.runtime.fold`, written straight into the bytes object that the interpreter gets.  There is no
writable staging copy of the model: each model built holds one copy of its bytes, the interpreter's.

    r = Refolder(load_bundle("m.tflite"))
    r.refold({"bn1": (mean, var)})        # returns the layers whose statistics changed
    it = r.interpreter(num_threads=4)
"""
from __future__ import annotations

import dataclasses
import io
from typing import Callable, Optional

import numpy as np
import tflite

from . import fold
from .bundle import buffer_span
from .interpreter import make_interpreter

# write_kernel(layer name, out): fill `out` (float32, TFLite layout) with the layer's folded kernel.
KernelWriter = Callable[[str, np.ndarray], None]


class _Slot:
    """One layer: where its buffers lie in the model, and its current unfolded kernel and statistics."""

    def __init__(self, rec, shape, w_span, b_span, source_kernel: Callable[[], np.ndarray]):
        self.rec, self.kind, self.shape, self._source_kernel = rec, rec.kind, shape, source_kernel
        self.w_span, self.b_span = w_span, b_span
        self.reset()

    def reset(self):
        rec = self.rec
        self._kernel = None  # the bundle's, fetched when first folded: a noisy model never folds it
        self.mean, self.var = rec.mean, rec.var

    @property
    def kernel(self) -> np.ndarray:
        """The unfolded kernel (TFLite layout); the bundle's is shared and read-only: replaced, never
        written in place."""
        if self._kernel is None:
            self._kernel = self._source_kernel()
        return self._kernel

    @kernel.setter
    def kernel(self, value: np.ndarray) -> None:
        self._kernel = value

    def scale(self) -> Optional[np.ndarray]:
        """Per-output-channel BN scale, None without BN."""
        return fold.bn_scale(self.rec.gamma, self.var, self.rec.eps) if self.rec.bn else None

    def fold_kernel(self, out: np.ndarray) -> np.ndarray:
        if self.rec.bn:
            return fold.fold_kernel(self.kind, self.kernel, self.scale(), out=out)
        np.copyto(out, self.kernel)
        return out

    def bias(self) -> Optional[np.ndarray]:
        """The folded bias (float32); None to keep the model's own (no bias buffer, or no BN and no bias
        in the sidecar)."""
        rec = self.rec
        if self.b_span is None:
            return None
        if rec.bn:
            return fold.fold_bias(self.scale(), rec.beta, self.mean, rec.bias)
        return None if rec.bias is None else np.asarray(rec.bias, np.float32)

    @property
    def w(self) -> np.ndarray:
        """The folded kernel, as `model_bytes()` writes it (TFLite layout)."""
        return self.fold_kernel(np.empty(self.shape, np.float32))

    @property
    def b(self) -> Optional[np.ndarray]:
        """The folded bias as `model_bytes()` writes it (None: the model's own is kept)."""
        return self.bias()


class Refolder:
    """New BN statistics and kernels of `bundle`, folded into new `.tflite` bytes (how: the module's docstring).

    Args:
        bundle: an exported `Bundle` with its sidecar.

    Raises:
        ValueError: the bundle has no sidecar, or the sidecar does not match the model (a BN layer without a
            bias buffer, a buffer shared by two layers or of the wrong size).
    """

    def __init__(self, bundle):
        if not bundle.layers:
            raise ValueError(f"{bundle.path}: no refold sidecar (.cbn.npz) — export the model with "
                             "`tools/convert.py` to get one")
        self.bundle = bundle
        data = bundle.model_bytes
        model = tflite.Model.GetRootAs(data, 0)
        used: dict[int, str] = {}
        self.layers: dict[str, _Slot] = {}
        self._by_bn: dict[str, _Slot] = {}
        for rec in bundle.layers:
            shape = fold.to_tflite(rec.kind, rec.kernel).shape
            w_span = self._span(model, rec.w_buffer, shape, rec.name, used)
            if rec.bn and rec.b_buffer is None:
                raise ValueError(f"layer {rec.name!r} has BN {rec.bn!r} but no bias buffer in the sidecar")
            b_span = None if rec.b_buffer is None else self._span(
                model, rec.b_buffer, (fold.out_channels(rec.kind, shape),), rec.name, used)
            # Through self.bundle, not `bundle`: `release_file` replaces it by a copy without the file.
            slot = self.layers[rec.name] = _Slot(rec, shape, w_span, b_span,
                                                 lambda rec=rec: self.bundle.tflite_kernel(rec))
            if rec.bn:
                self._by_bn[rec.bn] = slot
        # (start, end, slot, is_kernel) of every buffer written, in file order
        self._regions = sorted(((span[0], span[0] + span[1], slot, is_kernel) for slot in self.layers.values()
                                for span, is_kernel in ((slot.w_span, True), (slot.b_span, False)) if span),
                               key=lambda region: region[0])
        self._size = len(data)
        self._gaps = None  # the bytes between the regions, once `release_file` dropped the file

    def release_file(self) -> None:
        """Keep only the bytes between the buffers this refolder writes (the flatbuffer's tables and the
        other tensors: 1.5 of Lite0's 20 MB) and let go of the bundle's file: a model that every build
        rewrites (exact noise) then does not hold its file twice.  `self.bundle` becomes a copy without
        `model_bytes`."""
        data = memoryview(self.bundle.model_bytes)
        self._file_biases = {start: bytes(data[start:end]) for start, end, _, is_kernel in self._regions
                             if not is_kernel}
        self._gaps = [bytes(data[a:b]) for a, b in self._gap_bounds()]
        self.bundle = dataclasses.replace(self.bundle, model_bytes=None)

    def _gap_bounds(self) -> list[tuple[int, int]]:
        """(start, end) of the bytes before, between and after the regions written, in file order."""
        bounds = [0] + [b for start, end, _, _ in self._regions for b in (start, end)] + [self._size]
        return list(zip(bounds[::2], bounds[1::2]))

    def _file_bias(self, data, start: int, end: int):
        """A bias region as the file has it (a layer whose bias is never refolded)."""
        return data[start:end] if data is not None else self._file_biases[start]

    def _span(self, model, index, shape, name, used) -> tuple[int, int]:
        if index in used:
            raise ValueError(f"buffer {index} is shared by layers {used[index]!r} and {name!r}; refolding one "
                             "would change the other (the sidecar does not match this .tflite?)")
        used[index] = name
        start, size = buffer_span(self.bundle.model_bytes, index, model)
        if size != 4 * int(np.prod(shape)):
            raise ValueError(f"layer {name!r}: buffer {index} has {size} bytes, expected float32 {shape} "
                             "(the sidecar does not belong to this .tflite)")
        return start, size

    def layer(self, name: str) -> _Slot:
        """The state of a layer, by layer or BN name: `.w`/`.b` (folded, as written), `.kernel`
        (unfolded, TFLite layout), `.mean`/`.var`, `.scale()`, `.rec` (the sidecar record).

        Args:
            name: a layer name or the name of its BN.

        Returns:
            The layer's current state (live: later refolds change it).

        Raises:
            KeyError: no layer or BN of that name in the sidecar.
        """
        slot = self.layers.get(name) or self._by_bn.get(name)
        if slot is None:
            raise KeyError(f"no layer or BN named {name!r} in the sidecar")
        return slot

    def refold(self, stats: dict | None = None, kernels: dict | None = None) -> list[str]:
        """Take new BN statistics `{bn_name: (mean, var)}` and/or new unfolded kernels
        `{layer_name: kernel in Keras layout}` (e.g. noisy weights) for the next models built.  Arrays are
        used, not copied.  Returns the names of the layers that changed.

        Args:
            stats: {bn name: (mean, var)}, one value per channel each; None or BNs left out: unchanged.
            kernels: {layer name: unfolded kernel in Keras layout}; None or layers left out: unchanged.

        Returns:
            The names of the layers whose statistics or kernel changed, in the sidecar's order.

        Raises:
            KeyError: a BN or layer name that is not in the sidecar.
        """
        changed = set()
        for bn, (mean, var) in (stats or {}).items():
            slot = self._by_bn.get(bn)
            if slot is None:
                raise KeyError(f"no BN named {bn!r} in the sidecar")
            if not (np.array_equal(slot.mean, mean) and np.array_equal(slot.var, var)):
                slot.mean, slot.var = mean, var
                changed.add(slot.rec.name)
        for name, kernel in (kernels or {}).items():
            slot = self.layer(name)
            slot.kernel = fold.to_tflite(slot.kind, np.asarray(kernel, np.float32))
            changed.add(slot.rec.name)
        return [name for name in self.layers if name in changed]

    def reset(self) -> None:
        """Back to the bundle's own kernels and statistics."""
        for slot in self.layers.values():
            slot.reset()

    def model_bytes(self, write_kernel: KernelWriter | None = None, patches=()) -> bytes:
        """The current model, assembled in one pass into the bytes returned (interpreters may keep
        pointers into them).  `write_kernel` replaces the folding of the kernels (noise).

        Args:
            write_kernel: `write_kernel(layer name, out)` fills `out` (float32, TFLite layout) with the layer's
                folded kernel, e.g. `FoldedChip.write`; None folds the current kernels.
            patches: (byte offset, array) pairs written over other buffers' data (the sweep variant's states).

        Returns:
            The whole `.tflite` flatbuffer, as long as the bundle's.
        """
        data = None if self._gaps is not None else memoryview(self.bundle.model_bytes)
        bounds = self._gap_bounds()
        gaps = self._gaps or [data[a:b] for a, b in bounds]
        out = io.BytesIO()
        out.seek(self._size - 1)  # one allocation of the final size; getvalue() then hands it over uncopied
        out.write(b"\0")
        buffer = out.getbuffer()
        # Kernels are folded straight into the bytes: no scratch copy of the model's 20 MB per build.
        view, kernel = np.frombuffer(buffer, np.uint8), None
        for gap, (a, b), (start, end, slot, is_kernel) in zip(gaps, bounds, self._regions):
            view[a:b] = np.frombuffer(gap, np.uint8)
            if is_kernel:
                kernel = view[start:end].view(np.float32).reshape(slot.shape)
                if write_kernel is None:
                    slot.fold_kernel(kernel)
                else:
                    write_kernel(slot.rec.name, kernel)
            else:
                bias = slot.bias()
                bias = self._file_bias(data, start, end) if bias is None else np.ascontiguousarray(bias, np.float32)
                view[start:end] = np.frombuffer(bias, np.uint8)
        a, b = bounds[-1]
        view[a:b] = np.frombuffer(gaps[-1], np.uint8)
        for start, array in patches:
            patch = np.frombuffer(np.ascontiguousarray(array), np.uint8)
            view[start:start + patch.size] = patch
        del view, kernel
        buffer.release()  # no view left into the buffer: getvalue() hands it over without a copy
        return out.getvalue()

    def interpreter(self, num_threads: int | None = None, write_kernel: KernelWriter | None = None):
        """A fresh, allocated LiteRT interpreter for the current model.

        Args:
            num_threads: LiteRT threads (None: LiteRT's default).
            write_kernel: as in `model_bytes`.

        Returns:
            The interpreter, over new `model_bytes(write_kernel)`.

        Raises:
            MissingDependency: no TFLite interpreter is installed.
        """
        return make_interpreter(model_content=self.model_bytes(write_kernel), num_threads=num_threads)
