"""Keras models as users bring them (shared by tests): every place a BatchNorm can sit, nesting,
preprocessing layers, and randomised BN statistics so that folding mistakes show."""
import keras
import numpy as np
from keras import layers

SIZE = 32


def randomise(model, seed: int = 0) -> None:
    """Random weights already; BN statistics and affine parameters random too (nested models included)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomise(layer, seed + 1)
        if isinstance(layer, layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.3, c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0, 0.3, c))


def every_bn_kind(classes: int = 5) -> keras.Model:
    """A BN at the input, after an Add, after an activation, after a Concatenate, after pooling, after a
    SeparableConv2D and a Conv2DTranspose, after a Dense with an activation (rank 2), one whose conv also
    feeds a residual, behind a Rescaling layer.  The same weights at every call."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1, name="scale")(inp)
    x = layers.BatchNormalization(name="bn_in")(x)
    c1 = layers.Conv2D(8, 3, padding="same", name="c1")(x)
    c2 = layers.Conv2D(8, 1, name="c2")(x)
    a = layers.BatchNormalization(name="bn_add")(layers.Add(name="add")([c1, c2]))
    r = layers.ReLU(name="relu")(a)
    act = layers.Conv2D(8, 3, padding="same", activation="relu", name="c_act")(r)
    act = layers.BatchNormalization(name="bn_act")(act)
    shared = layers.Conv2D(8, 1, name="c_shared")(act)
    s_bn = layers.BatchNormalization(name="bn_shared")(shared)
    res = layers.Add(name="res")([s_bn, shared])
    sep = layers.SeparableConv2D(12, 3, padding="same", depth_multiplier=2, name="sep")(res)
    sep = layers.BatchNormalization(name="bn_sep")(sep)
    cat = layers.BatchNormalization(name="bn_cat")(layers.Concatenate(name="cat")([sep, r]))
    pool = layers.BatchNormalization(name="bn_pool")(layers.AveragePooling2D(2, name="pool")(cat))
    t = layers.Conv2DTranspose(6, 3, strides=2, padding="same", name="tconv")(pool)
    t = layers.BatchNormalization(name="bn_t")(t)
    g = layers.GlobalAveragePooling2D(name="gap")(t)
    d = layers.BatchNormalization(name="bn_d")(layers.Dense(10, activation="relu", name="d1")(g))
    out = layers.Dense(classes, name="head")(d)
    model = keras.Model(inp, out, name="every_bn_kind")
    randomise(model)
    return model


def backbone_in_sequential(classes: int = 3) -> keras.Model:
    """A keras.applications-style backbone (itself a functional model) inside a Sequential with a head and
    the preprocessing layers in front, as the Keras transfer-learning guide builds it."""
    keras.utils.set_random_seed(1)
    binp = keras.Input((SIZE, SIZE, 3))
    y = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(binp)
    y = layers.ReLU()(layers.BatchNormalization(name="stem_bn")(y))
    z = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(y)
    z = layers.BatchNormalization(name="dw_bn")(z)
    y = layers.Add(name="skip")([y, z])
    backbone = keras.Model(binp, y, name="backbone")
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), layers.Rescaling(1 / 255.0, name="to_unit"),
                              layers.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.052, 0.05, 0.051],
                                                   name="imagenet_norm"),
                              backbone, layers.GlobalAveragePooling2D(name="pool"), layers.Dense(classes, name="fc")],
                             name="transfer")
    randomise(model)
    return model


def bn_free(classes: int = 3) -> keras.Model:
    """No BatchNorm at all: converts and streams with nothing to calibrate."""
    inp = keras.Input((SIZE, SIZE, 3))
    x = layers.Rescaling(1 / 255.0)(inp)
    x = layers.Conv2D(4, 3, activation="relu", name="c")(x)
    return keras.Model(inp, layers.Dense(classes, name="fc")(layers.GlobalAveragePooling2D()(x)), name="bn_free")


def pixels(seed: int = 0, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8)


SHAPES = ("circle", "square", "triangle")


def shape_image(rng, cls: int) -> np.ndarray:
    """An RGB image of one filled shape of a random colour on a random noisy background."""
    import cv2

    img = np.full((SIZE, SIZE, 3), rng.integers(0, 256, 3), np.uint8)
    img = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    (cx, cy), r = rng.integers(11, 21, 2), int(rng.integers(6, 11))
    if cls == 0:
        cv2.circle(img, (int(cx), int(cy)), r, colour, -1)
    elif cls == 1:
        cv2.rectangle(img, (int(cx - r), int(cy - r)), (int(cx + r), int(cy + r)), colour, -1)
    else:
        cv2.fillPoly(img, [np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)], colour)
    return img


def shapes(n: int, seed: int):
    """(n images, n class ids) of `shape_image`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), n)
    return np.stack([shape_image(rng, c) for c in labels]), labels


def trained_shape_classifier(epochs: int = 8) -> keras.Model:
    """A small CNN (two conv + BN + ReLU blocks, a Rescaling in front) trained on `shapes` for a few
    seconds: about 78 % on held-out shapes, as a user's first model might be."""
    keras.utils.set_random_seed(0)
    x, y = shapes(1500, seed=0)
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    h = layers.Rescaling(1 / 255, name="to_unit")(inp)
    for i, filters in enumerate((16, 32)):
        h = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(h)
        h = layers.ReLU()(layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(h))
        h = layers.MaxPooling2D(name=f"pool{i}")(h)
    out = layers.Dense(len(SHAPES), name="classes")(layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out, name="shapes")
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x.astype(np.float32), y, batch_size=64, epochs=epochs, verbose=0)
    return model
