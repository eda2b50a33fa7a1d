"""Input checks shared by the models that take token ids."""

import keras
from keras import ops


class TokenInputsMixin:
    """Rejects non-integral `token_ids` before Keras casts them.

    A functional model casts its inputs to the dtype of its `keras.Input`
    (int32), which would silently truncate an id such as 1.5 to 1. Integral
    values in a float dtype pass (Keras's own input pipelines may convert
    integer arrays to floats, for instance under `tf.distribute`).

    `training` and `mask` are named in the signature: Keras passes the
    training flag on to the layers inside only to a `call` that names it.
    """

    def call(self, inputs, training=None, mask=None):
        if isinstance(inputs, dict) and "token_ids" in inputs:
            token_ids = inputs["token_ids"]
            dtype = keras.backend.standardize_dtype(token_ids.dtype)
            if "float" in dtype:
                inputs = dict(inputs, token_ids=_integral(token_ids, dtype))
        return super().call(inputs, training=training, mask=mask)


def _integral(token_ids, dtype):
    """`token_ids`, after checking that every value is a whole number."""
    message = f"token_ids must be whole numbers; received dtype {dtype} "
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        whole = tf.reduce_all(tf.equal(token_ids, tf.floor(token_ids)))
        check = tf.debugging.Assert(whole, [message + "with fractions"])
        with tf.control_dependencies([check]):
            return tf.identity(token_ids)
    values = ops.convert_to_numpy(token_ids)
    if (values != values.round()).any():
        raise ValueError(message + f"with fractions such as {values.max()}.")
    return token_ids
