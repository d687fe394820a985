"""A user's Keras model as one flat functional graph of layers the export knows: the step before folding.

`flat_model(model)` rebuilds the graph with a fresh copy of every layer (the user's model is left as it
was) and
- inlines nested models (a keras.applications backbone inside a Sequential with a head, the
  Rescaling/Normalization in front of it), so that every BatchNorm is a layer of the top graph;
- splits each SeparableConv2D into its two convolutions, a DepthwiseConv2D `NAME_depthwise` and a 1x1
  Conv2D `NAME` (the conv a BatchNorm after it folds into, and the pair TFLite runs anyway).

Every other layer is copied as it is, with its config and weights: the converter decides whether LiteRT
can run it (`export.convert_keras` names the layer when it cannot).
"""
from __future__ import annotations

from .tf_import import keras


class GraphError(ValueError):
    """A model that cannot be made one flat graph; the message names the layer."""


def _copy(layer):
    """A fresh layer of the same class and config (weights set once it is built)."""
    try:
        return layer.__class__.from_config(layer.get_config())
    except Exception as e:  # a custom layer whose config does not round-trip
        raise GraphError(f"layer {layer.name!r} ({type(layer).__name__}) cannot be copied from its config: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _separable_parts(layer) -> tuple:
    """(DepthwiseConv2D, 1x1 Conv2D) that compute what SeparableConv2D `layer` does."""
    cfg = layer.get_config()
    depthwise = keras.layers.DepthwiseConv2D(
        cfg["kernel_size"], strides=cfg["strides"], padding=cfg["padding"], depth_multiplier=cfg["depth_multiplier"],
        dilation_rate=cfg["dilation_rate"], use_bias=False, name=f"{layer.name}_depthwise")
    pointwise = keras.layers.Conv2D(cfg["filters"], 1, use_bias=cfg["use_bias"], activation=cfg["activation"],
                                    name=layer.name)
    return depthwise, pointwise


class _Rebuild:
    """The callables that `Functional._run_through_graph` calls in place of each operation."""

    def __init__(self, skip=()):
        self.skip = set(skip)  # names of layers replaced by the identity
        self.copies: dict[int, object] = {}  # id(original layer) -> its copy (a shared layer stays shared)
        self.weights: list[tuple] = []  # (original, [copies]) whose weights are set once all are built

    def __call__(self, op):
        if isinstance(op, keras.Model):
            return self._inline(op)
        if op.name in self.skip:
            return lambda x, **_: x
        if id(op) not in self.copies:
            self.copies[id(op)] = self._replacement(op)
        return self.copies[id(op)]

    def _replacement(self, op):
        if not isinstance(op, keras.layers.Layer):  # a keras.ops operation (x + 3 in MobileNetV3): stateless
            return op
        if type(op).__name__ == "SeparableConv2D":
            depthwise, pointwise = _separable_parts(op)
            self.weights.append((op, [depthwise, pointwise]))
            return lambda x, **_: pointwise(depthwise(x))
        copy = _copy(op)
        self.weights.append((op, [copy]))
        return copy

    def _inline(self, model):
        graph = model
        if not hasattr(model, "_run_through_graph"):  # a Sequential: its functional twin, once it is built
            graph = getattr(model, "_functional", None)
            if graph is None:
                raise GraphError(f"nested model {model.name!r} is not built: give it an Input shape")
        elif not hasattr(model, "_nodes_by_depth"):
            raise GraphError(f"nested model {model.name!r} is a subclassed model: only functional and "
                             "Sequential models can be converted")
        return lambda *args, **kwargs: graph._run_through_graph(args[0] if len(args) == 1 else args, self)

    def set_weights(self) -> None:
        for original, copies in self.weights:
            values = original.get_weights()
            if len(copies) == 2:  # SeparableConv2D: depthwise kernel; pointwise kernel (+ bias)
                copies[0].set_weights(values[:1])
                copies[1].set_weights(values[1:])
            else:
                copies[0].set_weights(values)


def needs_flattening(model) -> bool:
    """Whether `model` holds a nested model or a SeparableConv2D, or is a Sequential."""
    return isinstance(model, keras.Sequential) or any(
        isinstance(layer, keras.Model) or type(layer).__name__ == "SeparableConv2D" for layer in model.layers)


def flat_model(model, input_hw: tuple | None = None, skip=()) -> "keras.Model":
    """One functional graph computing what `model` does, nested models inlined and SeparableConv2D split
    (the module's docstring).

    Args:
        model: a Keras functional or Sequential model with a known input shape.
        input_hw: (H, W) to fix a free input size at (one image input).
        skip: names of single-input layers to leave out (the identity in their place).

    Returns:
        A new functional model whose layers are copies (named as the originals) holding the same weights.

    Raises:
        GraphError: a subclassed or unbuilt model, a layer that cannot be copied, or two layers of one name.
    """
    if isinstance(model, keras.Sequential):
        if getattr(model, "_functional", None) is None:
            raise GraphError(f"model {model.name!r} is not built: give it an Input shape")
    elif not hasattr(model, "_nodes_by_depth"):
        raise GraphError(f"model {model.name!r} is a subclassed model: only functional and Sequential models "
                         "can be converted")
    shapes = [tuple(t.shape) for t in model.inputs]
    if input_hw is not None:
        shapes = [(s[0], *input_hw, *s[3:]) for s in shapes]
    inputs = [keras.Input(batch_shape=s, dtype=t.dtype, name=t._keras_history.operation.name)
              for s, t in zip(shapes, model.inputs)]
    rebuild = _Rebuild(skip)
    outputs = rebuild._inline(model)(*inputs)
    try:
        flat = keras.Model(inputs, outputs, name=model.name)
    except ValueError as e:  # Keras: "The name ... is used 2 times in the model. All operation names should be unique."
        raise GraphError(f"model {model.name!r}: {str(e).splitlines()[0]}") from None
    rebuild.set_weights()
    return flat
