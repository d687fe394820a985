"""Refold BatchNorm statistics (and optionally perturbed kernels) into an exported `.tflite` on the
device, without TensorFlow and without reconverting ("re-fuse" in the CLI and docs).

`Refolder` keeps a writable copy of the flatbuffer and float32 numpy views onto every folded kernel and
bias buffer (located once through the `tflite` schema package).  Re-fusing is then the folding
arithmetic of `edge_cbn.runtime.fold` written straight into those views: no parsing, no allocation of kernel-sized
temporaries.  A fresh LiteRT interpreter is built from the bytes with `interpreter()`.

    r = Refolder(load_bundle("m.tflite"))
    r.refold({"bn1": (mean, var)})        # only layers whose statistics changed are rewritten
    it = r.interpreter(num_threads=4)
"""
from __future__ import annotations

import numpy as np
import tflite

from . import fold
from .bundle import buffer_span
from .interpreter import make_interpreter


class _Slot:
    """Mutable state of one layer: views into the flatbuffer plus the current unfolded tensors."""

    def __init__(self, rec, w, b, kernel):
        self.rec, self.kind, self.w, self.b, self._source_kernel = rec, rec.kind, w, b, kernel
        self.reset()
        self.dirty = False  # the model as loaded already holds the bundle's folded tensors

    def reset(self):
        rec = self.rec
        self.kernel = self._source_kernel  # shared and read-only: replaced, never written in place
        self.mean, self.var = rec.mean, rec.var
        self.dirty = True

    def scale(self) -> np.ndarray:
        return fold.bn_scale(self.rec.gamma, self.var, self.rec.eps)

    def write(self):
        rec = self.rec
        if rec.bn:
            s = self.scale()
            fold.fold_kernel(self.kind, self.kernel, s, out=self.w)
            fold.fold_bias(s, rec.beta, self.mean, rec.bias, out=self.b)
        else:
            np.copyto(self.w, self.kernel)
            if self.b is not None and rec.bias is not None:
                self.b[...] = rec.bias
        self.dirty = False


class Refolder:
    def __init__(self, bundle):
        if not bundle.layers:
            raise ValueError(f"{bundle.path}: no re-fuse sidecar (.cbn.npz) — export the model with "
                             "`tools/convert.py` to get one")
        self.bundle = bundle
        self._buf = bytearray(bundle.model_bytes)
        model = tflite.Model.GetRootAs(self._buf, 0)
        used: dict[int, str] = {}
        self.layers: dict[str, _Slot] = {}
        self._by_bn: dict[str, _Slot] = {}
        for rec in bundle.layers:
            shape = fold.to_tflite(rec.kind, rec.kernel).shape
            w = self._view(model, rec.w_buffer, shape, rec.name, used)
            if rec.bn and rec.b_buffer is None:
                raise ValueError(f"layer {rec.name!r} has BN {rec.bn!r} but no bias buffer in the sidecar")
            b = None if rec.b_buffer is None else self._view(
                model, rec.b_buffer, (fold.out_channels(rec.kind, shape),), rec.name, used)
            slot = self.layers[rec.name] = _Slot(rec, w, b, bundle.tflite_kernel(rec))
            if rec.bn:
                self._by_bn[rec.bn] = slot

    def _view(self, model, index, shape, name, used):
        if index in used:
            raise ValueError(f"buffer {index} is shared by layers {used[index]!r} and {name!r}; re-fusing one "
                             "would change the other (the sidecar does not match this .tflite?)")
        used[index] = name
        start, size = buffer_span(self._buf, index, model)
        if size != 4 * int(np.prod(shape)):
            raise ValueError(f"layer {name!r}: buffer {index} has {size} bytes, expected float32 {shape} "
                             "(the sidecar does not belong to this .tflite)")
        return np.frombuffer(self._buf, np.float32, int(np.prod(shape)), start).reshape(shape)

    def layer(self, name: str) -> _Slot:
        """The state of a layer, by layer or BN name: `.w`/`.b` (folded, live views into the model),
        `.kernel` (unfolded, TFLite layout), `.mean`/`.var`, `.scale()`, `.rec` (the sidecar record)."""
        slot = self.layers.get(name) or self._by_bn.get(name)
        if slot is None:
            raise KeyError(f"no layer or BN named {name!r} in the sidecar")
        return slot

    def refold(self, stats: dict | None = None, kernels: dict | None = None) -> list[str]:
        """Fold new BN statistics `{bn_name: (mean, var)}` and/or new unfolded kernels
        `{layer_name: kernel in Keras layout}` (e.g. noisy weights) into the model.  Layers whose stats
        and kernel are unchanged are not rewritten.  Arrays are used, not copied.  Returns the names of
        the rewritten layers."""
        for bn, (mean, var) in (stats or {}).items():
            slot = self._by_bn.get(bn)
            if slot is None:
                raise KeyError(f"no BN named {bn!r} in the sidecar")
            if not (np.array_equal(slot.mean, mean) and np.array_equal(slot.var, var)):
                slot.mean, slot.var, slot.dirty = mean, var, True
        for name, kernel in (kernels or {}).items():
            slot = self.layer(name)
            slot.kernel, slot.dirty = fold.to_tflite(slot.kind, np.asarray(kernel, np.float32)), True
        done = [name for name, slot in self.layers.items() if slot.dirty]
        for name in done:
            self.layers[name].write()
        return done

    def reset(self) -> None:
        """Rewrite every layer from the bundle's own kernels and statistics."""
        for slot in self.layers.values():
            slot.reset()
            slot.write()

    def model_bytes(self) -> bytes:
        """A snapshot of the current model (interpreters may keep pointers into the bytes they get)."""
        return bytes(self._buf)

    def interpreter(self, num_threads: int | None = None):
        """A fresh, allocated LiteRT interpreter for the current model."""
        return make_interpreter(model_content=self.model_bytes(), num_threads=num_threads)
