"""TensorFlow and Keras for the converter, imported once with their native start-up log silenced
(`runtime.native_log`): every module here takes them from this one."""
from ..runtime.native_log import silenced

with silenced():
    import keras
    import tensorflow as tf

    tf.config.list_physical_devices()  # CUDA probing happens here, inside the silence

__all__ = ["keras", "tf"]
