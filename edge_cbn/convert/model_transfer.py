"""A Keras model as a worker process receives it: its architecture as Keras JSON and its weights as numpy
arrays, never a TensorFlow object.  Exact (the same weights, bit for bit, whatever they were loaded from,
random ones included) and independent of files on the worker's machine."""
from __future__ import annotations


def model_spec(model) -> tuple:
    """(architecture JSON, weight arrays) of a Keras functional model."""
    return model.to_json(), model.get_weights()


def model_from_spec(spec: tuple):
    """The Keras model of `model_spec`."""
    from .tf_import import keras  # lazy: TensorFlow, only when a model is rebuilt from its spec

    architecture, weights = spec
    model = keras.models.model_from_json(architecture)
    model.set_weights(weights)
    return model
