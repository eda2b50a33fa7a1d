"""Metrics for byte-level language models."""

import math

import keras
from keras import ops


def bits_per_byte(y_true, y_pred):
    """Per-position cross-entropy in bits of next-byte logits.

    Args:
        y_true: int tensor of byte ids, shape `(...)`.
        y_pred: logits, shape `(..., vocabulary)`.

    Returns:
        float tensor of shape `(...)`: `-log2 softmax(y_pred)[y_true]`.
    """
    nats = keras.losses.sparse_categorical_crossentropy(
        ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred),
        from_logits=True)
    return ops.divide(nats, math.log(2.0))


@keras.saving.register_keras_serializable(package="keras_reformer")
class BitsPerByte(keras.metrics.Mean):
    """Mean cross-entropy of next-byte predictions, in bits.

    The sparse categorical cross-entropy of the logits divided by `ln 2`,
    averaged over every position (and weighted by `sample_weight` if given).
    A uniform guess over 256 byte values scores 8.0; lower is better.

    Args:
        name: str, the metric name (`val_` is prefixed on validation data).
        dtype: the metric's dtype.

    Example:
    >>> metric = BitsPerByte()
    >>> metric.update_state([[1]], keras.ops.zeros((1, 1, 256)))
    >>> round(float(metric.result()), 3)
    8.0
    """

    def __init__(self, name="bits_per_byte", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(bits_per_byte(y_true, y_pred),
                                    sample_weight=sample_weight)
