"""A `.tflite` file as edge-cbn reads it (the `tflite` schema package, no TensorFlow): where a buffer's
bytes are, the input tensor, and `check_model`, the structural check every model passes at load.

`check_model` lets LiteRT judge first (its flatbuffer verifier and interpreter builder, without delegates:
a millisecond), then walks the schema for what edge-cbn relies on (one subgraph, one small image input,
buffers inside the file, finite float constants), then has LiteRT allocate the tensors, which prepares
every op.  The input size is checked before anything is allocated for it.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import tflite

from .interpreter import interpreter_class
from .native_log import silenced
from .validation import Invalid

MAX_INPUT_SIDE = 4096  # pixels: no camera-stream model is larger, and an input of 70000² allocates GBs
INPUT_TYPES = {tflite.TensorType.FLOAT32: np.dtype(np.float32), tflite.TensorType.UINT8: np.dtype(np.uint8)}


def buffer_span(model_bytes, index: int, model=None) -> tuple[int, int]:
    """(byte offset, byte length) of buffer `index`'s data in the file; (0, 0) for an empty buffer.
    Handles both inline data (the usual case) and the `offset`/`size` fields of files over 2 GB."""
    model = model or tflite.Model.GetRootAs(model_bytes, 0)
    if not 0 <= index < model.BuffersLength():
        raise ValueError(f"buffer {index} does not exist (the model has {model.BuffersLength()})")
    buf = model.Buffers(index)
    if buf.Offset() > 1:  # data stored after the flatbuffer, offset relative to the file start
        start, size = buf.Offset(), buf.Size()
    else:
        field = buf._tab.Offset(4)
        if field == 0:
            return 0, 0
        start, size = buf._tab.Vector(field), buf._tab.VectorLen(field)
    if start + size > len(model_bytes):
        raise ValueError(f"buffer {index} lies outside the model data ({start}+{size} > {len(model_bytes)} "
                         "bytes): truncated or external-data .tflite, which refold does not support")
    return start, size


def _input_tensor(model_bytes):
    sg = tflite.Model.GetRootAs(model_bytes, 0).Subgraphs(0)
    return sg.Tensors(int(sg.Inputs(0)))


def input_shape(model_bytes) -> tuple:
    """Shape of the model's (first) input tensor, e.g. (1, 224, 224, 3)."""
    return _shape(_input_tensor(model_bytes))


def input_dtype(model_bytes) -> np.dtype:
    """numpy dtype of the model's input: uint8 for models that take RGB pixels as they are (edge-cbn's
    own exports normalise inside the graph), float32 for pre-normalised input."""
    code = _input_tensor(model_bytes).Type()
    if code not in INPUT_TYPES:
        raise ValueError(f"unsupported model input type {code} (expected float32 or uint8)")
    return INPUT_TYPES[code]


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What a checked model's flatbuffer says, for the checks of its sidecar."""
    input_shape: tuple        # (1, H, W, 3)
    input_dtype: np.dtype     # uint8 (pixels, normalised in the graph) or float32
    output_shapes: tuple      # of tuples, in the subgraph's output order
    buffer_sizes: tuple       # bytes of each buffer's data

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.input_shape[1], self.input_shape[2]


def check_identifier(head: bytes) -> None:
    """The first 8 bytes of a .tflite: root offset, then the file identifier TFL3."""
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise Invalid("not a TFLite model (no TFL3 file identifier)")


def check_model(model_bytes: bytes) -> ModelFacts:
    """The facts of a usable `.tflite`; `Invalid` (or whatever a parser raises on a hostile file: the
    caller's `validation.refusing` block names the file) otherwise."""
    check_identifier(model_bytes[:8])
    interpreter = _unallocated_interpreter(model_bytes)
    facts = model_facts(model_bytes)
    with silenced():
        interpreter.allocate_tensors()
    return facts


def _unallocated_interpreter(model_bytes: bytes):
    """A LiteRT interpreter without delegates and without tensors allocated: LiteRT's own flatbuffer
    verifier and builder, at a millisecond (the stream builds its real interpreters later)."""
    cls = interpreter_class()
    resolver = getattr(sys.modules[cls.__module__], "OpResolverType", None)
    kwargs = {"experimental_op_resolver_type": resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES} if resolver else {}
    with silenced():
        return cls(model_content=bytes(model_bytes), num_threads=1, **kwargs)


def model_facts(model_bytes: bytes) -> ModelFacts:
    """Walk the (verified) flatbuffer: one subgraph with one input of shape (1, H, W, 3), H and W within
    MAX_INPUT_SIDE, uint8 or float32; every buffer inside the file; every float32 constant finite."""
    model = tflite.Model.GetRootAs(model_bytes, 0)
    if model.SubgraphsLength() != 1:
        raise Invalid(f"{model.SubgraphsLength()} subgraphs; edge-cbn runs models with exactly one")
    graph = model.Subgraphs(0)
    if graph.InputsLength() != 1 or graph.OutputsLength() < 1:
        raise Invalid(f"{graph.InputsLength()} inputs and {graph.OutputsLength()} outputs; edge-cbn runs "
                      "models with one image input")
    sizes = tuple(buffer_span(model_bytes, i, model)[1] for i in range(model.BuffersLength()))
    for i in range(graph.TensorsLength()):
        _check_constant(model_bytes, model, graph.Tensors(i), sizes)
    tensor = graph.Tensors(int(graph.Inputs(0)))
    shape = _shape(tensor)
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or not all(1 <= d <= MAX_INPUT_SIDE for d in shape[1:3]):
        raise Invalid(f"input shape {shape}; expected (1, H, W, 3) with H and W from 1 to {MAX_INPUT_SIDE}")
    if tensor.Type() not in INPUT_TYPES:
        raise Invalid(f"input tensor type {tensor.Type()}; expected float32 or uint8")
    outputs = tuple(_shape(graph.Tensors(int(graph.Outputs(i)))) for i in range(graph.OutputsLength()))
    return ModelFacts(shape, INPUT_TYPES[tensor.Type()], outputs, sizes)


def _shape(tensor) -> tuple:
    shape = tensor.ShapeAsNumpy()
    return () if isinstance(shape, int) else tuple(int(d) for d in shape)


def _check_constant(model_bytes, model, tensor, sizes) -> None:
    """A float32 constant (a tensor with data) holds exactly its shape's values, all finite: a flipped
    exponent bit must not serve NaN."""
    index, name = tensor.Buffer(), (tensor.Name() or b"").decode("utf-8", "replace")
    name = name if len(name) <= 60 else "…" + name[-59:]  # converter names run to hundreds of characters
    if not 0 <= index < len(sizes):
        raise Invalid(f"tensor {name!r} refers to buffer {index}; the model has {len(sizes)}")
    if tensor.Type() != tflite.TensorType.FLOAT32 or not sizes[index]:
        return
    start, size = buffer_span(model_bytes, index, model)
    count = math.prod(_shape(tensor))  # Python ints: a hostile shape cannot wrap around to the buffer size
    if size != 4 * count:
        raise Invalid(f"tensor {name!r}: buffer {index} has {size} bytes, its shape needs {4 * count}")
    if not np.isfinite(np.frombuffer(model_bytes, np.float32, count, start)).all():
        raise Invalid(f"tensor {name!r} holds non-finite constants (NaN or Inf)")
