"""Input checks that fail loudly (or poison outputs with NaN under XLA)
instead of reading garbage: token ids, gathered positions, masks."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_reformer")
class TokenIdCheck(keras.layers.Layer):
    """Checks that token ids lie in `[0, vocabulary)`.

    An embedding gather with a bad id is silently wrong on some devices (on
    GPU it returns zeros). This layer returns the ids (to embed) and a
    factor to multiply the embeddings by, `(batch, length, 1)`: 1 for valid
    ids, NaN for bad ones; and it raises where the backend can raise, before
    the embedding runs:

    - TensorFlow eager and graph mode, and so an exported SavedModel: an
      assertion raises `InvalidArgumentError` naming the range;
    - other backends with concrete (eager) ids: `ValueError`;
    - inside XLA (`jit_compile=True`, JAX's jit), which drops assertions:
      the NaN factor makes every affected output NaN instead of plausible.

    Args:
        vocabulary_size: int, the number of valid ids.

    Example:
    >>> ids, factor = TokenIdCheck(10)(keras.ops.array([[3, 9]]))
    >>> keras.ops.convert_to_numpy(factor)[..., 0]
    array([[1., 1.]], dtype=float32)
    >>> TokenIdCheck(10)(keras.ops.array([[3, 12]]))
    ... # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    InvalidArgumentError: ... token ids must be in [0, 10) ...
    """

    def __init__(self, vocabulary_size, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size

    def call(self, token_ids):
        if token_ids.shape[-1] == 0:
            raise ValueError(
                "token_ids must hold at least one token per sequence; "
                f"received shape {tuple(token_ids.shape)}.")
        return checked_indices(
            token_ids, self.vocabulary_size,
            f"token ids must be in [0, {self.vocabulary_size}) "
            f"(vocabulary_size={self.vocabulary_size})", self.compute_dtype)

    def compute_output_spec(self, token_ids):
        shape = tuple(token_ids.shape)
        return (keras.KerasTensor(shape, token_ids.dtype),
                keras.KerasTensor(shape + (1,), self.compute_dtype))

    def get_config(self):
        config = super().get_config()
        config["vocabulary_size"] = self.vocabulary_size
        return config


MASK_RULE = "must hold only 0 and 1 (or False and True)"


def checked_indices(indices, upper, message, dtype):
    """`indices` and a factor that is 1 where `0 <= index < upper`, NaN
    elsewhere (`indices.shape + (1,)`, in `dtype`), raising first where the
    backend can (see `TokenIdCheck`).

    Args:
        indices: int tensor.
        upper: int or scalar int tensor, the exclusive upper bound.
        message: str, what the error says (the valid range).
        dtype: the factor's dtype.
    """
    valid = ops.logical_and(indices >= 0, indices < upper)
    factor = ops.cast(ops.where(valid, 1.0, float("nan"))[..., None], dtype)
    return raise_unless(valid, indices, message, indices, factor)


def checked_mask(mask, name="padding_mask"):
    """`mask` as bool, after checking that it holds only 0 and 1.

    The package's one rule for masks: 1 (or True) is a real token, 0 (or
    False) padding, and any other value (0.5, 2) an error, raised where the
    backend can (see `raise_unless`), rather than read as padding by an
    integer cast and as a real token by a bool cast.

    Args:
        mask: bool, int or float tensor.
        name: str, the input's name in the error.

    Returns:
        The bool mask.
    """
    if keras.backend.standardize_dtype(mask.dtype) == "bool":
        return mask
    mask = raise_unless(mask_values_valid(mask), mask,
                        f"{name} {MASK_RULE}", mask)
    return ops.cast(mask, "bool")


def mask_values_valid(mask):
    """Bool tensor: True where `mask` is 0 or 1."""
    return ops.logical_or(ops.equal(mask, 0), ops.equal(mask, 1))


def raise_unless(valid, values, message, *outputs):
    """`outputs`, after raising `message` where `valid` (bool) is not all
    True and the backend can raise: an `InvalidArgumentError` from a
    TensorFlow assertion (eager, graph, SavedModel), a `ValueError` naming
    the bad `values` elsewhere when they are concrete. Under XLA or a JAX
    trace nothing is raised: the caller makes the affected outputs NaN.

    Returns:
        `outputs` (one tensor if one was given).
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        check = tf.debugging.Assert(tf.reduce_all(valid), [message])
        with tf.control_dependencies([check]):
            outputs = [tf.identity(x) for x in outputs]
    elif not _is_traced(valid):
        valid = ops.convert_to_numpy(valid)
        if not valid.all():
            raise value_error(message, values, valid)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def value_error(message, values, valid):
    """`ValueError(message)` naming a few of the `values` where the numpy
    bool array `valid` is False."""
    bad = ops.convert_to_numpy(values)[~valid]
    return ValueError(f"{message}; received values such as "
                      f"{sorted(set(bad.tolist()))[:3]}.")


def _is_traced(x):
    try:
        ops.convert_to_numpy(x)
        return False
    except Exception:  # tracers (jit, symbolic) cannot become numpy
        return True
