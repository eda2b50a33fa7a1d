"""Padding masks: resolving them, applying them, padding to chunks.

Kept apart from the attention layers so that layers which only pass masks
on (the reversible stack, say) import no attention code.
"""

from keras import ops

from keras_reformer.layers.token_id_check import checked_mask


def zero_padding(outputs, valid):
    """`outputs` `(batch, length, ...)` with zeros where `valid`
    `(batch, length)` is False, whatever they held there (NaN or inf
    included: selected away, not multiplied by zero)."""
    valid = ops.reshape(valid, tuple(ops.shape(valid)) + (1,) * (
        len(outputs.shape) - 2))
    return ops.where(valid, outputs, ops.zeros_like(outputs))


def padding_mask_or_ones(padding_mask, inputs, keras_mask=None):
    """A bool `(batch, length)` mask, all True when `padding_mask` is None.

    `keras_mask` is the mask Keras hands a layer from an earlier one (such
    as `Embedding(mask_zero=True)`); a token is real only where both masks
    say so.

    Masks hold 0 and 1 (or bools); other values raise (see
    `checked_mask`).

    Raises:
        ValueError: the mask's static shape is not the inputs' first two
            axes.
    """
    if keras_mask is not None:
        keras_mask = _checked_mask(keras_mask, inputs, "mask")
        if padding_mask is None:
            return keras_mask
        return ops.logical_and(keras_mask, padding_mask_or_ones(
            padding_mask, inputs))
    if padding_mask is None:
        return ops.ones(ops.shape(inputs)[:2], dtype="bool")
    return _checked_mask(padding_mask, inputs, "padding_mask")


def _checked_mask(padding_mask, inputs, name):
    mask_shape = tuple(padding_mask.shape)
    expected = tuple(inputs.shape[:2])
    if len(mask_shape) != 2 or any(
            a is not None and b is not None and a != b
            for a, b in zip(mask_shape, expected)):
        raise ValueError(
            f"{name} must have shape (batch, length) = {expected}, "
            f"matching the inputs; received shape {mask_shape}.")
    return checked_mask(padding_mask, name)


def prefix_mask(inputs, prefix_length):
    """`(batch, length)` bool, True at positions before `prefix_length`."""
    positions = ops.arange(ops.shape(inputs)[1], dtype="int32")
    return ops.broadcast_to(positions[None] < prefix_length,
                            ops.shape(inputs)[:2])


def pad_to_multiple(inputs, valid, multiple):
    """Pads the length axis of `inputs` and `valid` to a multiple.

    Args:
        inputs: `(batch, length, hidden)`.
        valid: `(batch, length)` bool.
        multiple: int.

    Returns:
        `(inputs, valid)` padded with zeros / False at the end.
    """
    batch, length = ops.shape(inputs)[0], ops.shape(inputs)[1]
    extra = (-length) % multiple
    inputs = ops.concatenate(
        [inputs, ops.zeros((batch, extra, ops.shape(inputs)[2]), inputs.dtype)],
        axis=1,
    )
    valid = ops.concatenate(
        [valid, ops.zeros((batch, extra), "bool")], axis=1
    )
    return inputs, valid
