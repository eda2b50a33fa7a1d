"""Out-of-range token ids raise instead of reading garbage embeddings."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_reformer")
class TokenIdCheck(keras.layers.Layer):
    """Passes token ids through, raising if one is outside `[0, vocabulary)`.

    An embedding gather with a bad id is silently wrong on some devices (on
    GPU it returns zeros). On TensorFlow the check is an assertion in the
    graph, so it also runs in an exported SavedModel; XLA drops assertions,
    so under `jit_compile=True` it cannot fire. On other backends it checks
    concrete (eager) ids only.

    Args:
        vocabulary_size: int, the number of valid ids.

    Example:
    >>> TokenIdCheck(10)(keras.ops.array([[3, 12]]))  # raises: 12 >= 10
    """

    def __init__(self, vocabulary_size, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size

    def call(self, token_ids):
        if token_ids.shape[-1] == 0:
            raise ValueError(
                "token_ids must hold at least one token per sequence; "
                f"received shape {tuple(token_ids.shape)}.")
        message = (f"token ids must be in [0, {self.vocabulary_size}) "
                   f"(vocabulary_size={self.vocabulary_size})")
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            checks = [
                tf.debugging.assert_non_negative(token_ids, message=message),
                tf.debugging.assert_less(
                    token_ids, tf.cast(self.vocabulary_size, token_ids.dtype),
                    message=message),
            ]
            with tf.control_dependencies(checks):
                return tf.identity(token_ids)
        if not _is_traced(token_ids):
            values = ops.convert_to_numpy(token_ids)
            if values.size and (values.min() < 0
                                or values.max() >= self.vocabulary_size):
                raise ValueError(f"{message}; received ids from "
                                 f"{values.min()} to {values.max()}.")
        return token_ids

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["vocabulary_size"] = self.vocabulary_size
        return config


def _is_traced(x):
    try:
        ops.convert_to_numpy(x)
        return False
    except Exception:  # tracers (jit, symbolic) cannot become numpy
        return True
