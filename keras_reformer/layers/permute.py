"""Reordering rows by known permutations, differentiated by gathering.

LSH attention reorders every head's tokens by each round's sort and back.
Autodiff would differentiate each `take_along_axis` by scattering into a
zero buffer; here the gradient gathers instead, with the inverse
permutation the layer already has: no scatter-add (slow on accelerators)
and no zero buffers (which XLA allocates early, one per layer, so that a
reversible stack's memory grew with its depth).

Rows are gathered by the backend's own row gather (`take_rows`).
"""

import keras
from keras import ops

from keras_reformer.layers.custom_gradient import with_custom_gradient


def gather_rows(x, index, inverse, copies=1):
    """`x` reordered along axis 2: row `j` of the result is `x[..., index[j]]`.

    Args:
        x: `(batch, heads, rows, ...)` float tensor.
        index: `(batch, heads, copies * rows)` int, each row of `x` picked
            exactly `copies` times.
        inverse: `(batch, heads, copies * rows)` int: for copy `c` and row
            `r`, entry `c * rows + r` is where `index` picks row `r` for the
            `c`-th time (so `index[inverse[c * rows + r]] == r`).
        copies: int.

    Returns:
        `(batch, heads, copies * rows, ...)`; its gradient with respect to
        `x` is the output gradient gathered at `inverse`, summed over the
        copies.

    Example:
    >>> x = ops.reshape(ops.arange(3.0), (1, 1, 3))
    >>> ops.convert_to_numpy(gather_rows(
    ...     x, ops.array([[[2, 0, 1]]]), ops.array([[[1, 2, 0]]])))
    array([[[2., 0., 1.]]], dtype=float32)
    """

    def forward(x, index, inverse):
        return (take_rows(x, index),), (inverse, ops.shape(x))

    def backward(residuals, output_grads):
        inverse, shape = residuals
        return (gathered_back(output_grads[0], inverse, shape, copies),
                None, None)

    (outputs,) = with_custom_gradient(forward, backward)(x, index, inverse)
    return outputs


def gathered_back(rows, inverse, shape, copies=1):
    """What `gather_rows` sends back to `x` (shape `shape`) of `rows`
    shaped like its result: `rows` gathered at `inverse`, summed over the
    copies. `gather_rows`'s gradient, and the sum of the gradients that
    its result's rows carry to the rows of `x` they came from."""
    gathered = take_rows(rows, inverse)
    if copies > 1:
        gathered = ops.sum(ops.reshape(
            gathered, (shape[0], shape[1], copies) + tuple(shape[2:])),
            axis=2)
    return gathered


def inverse_permutation(order):
    """The inverse of each permutation `order` `(..., n)` int32 along its
    last axis: entry `order[..., j]` of the result is `j`.

    On TensorFlow a scatter of the positions (XLA's CPU sort, which
    `argsort` is, costs about 120 ns an element: 90 ms for 8 heads, 4
    rounds and 16,384 tokens, the scatter 1 ms); elsewhere `argsort`.

    Example:
    >>> ops.convert_to_numpy(inverse_permutation(ops.array([[2, 0, 1]])))
    array([[1, 2, 0]], dtype=int32)
    """
    if keras.backend.backend() != "tensorflow":
        return ops.cast(ops.argsort(order, axis=-1), "int32")
    import tensorflow as tf

    shape = tf.shape(order)
    rows = tf.reshape(order, (-1, shape[-1]))
    row = tf.broadcast_to(tf.range(tf.shape(rows)[0])[:, None],
                          tf.shape(rows))
    slots = tf.broadcast_to(tf.range(shape[-1])[None], tf.shape(rows))
    return tf.reshape(tf.scatter_nd(tf.stack([row, rows], -1), slots,
                                    tf.shape(rows)), shape)


def order_by_key(keys, num_keys):
    """The positions of each row of `keys` `(..., n)` int32 (values in
    `[0, num_keys)`) ordered by `(key, position)`.

    When `num_keys * n` fits in int32 (and `n` is known), one sort of the
    combined keys `key * n + position`, which hold the position; otherwise
    (256K tokens with the default buckets) a stable argsort of the keys,
    so that the combined keys never overflow.

    Example:
    >>> ops.convert_to_numpy(order_by_key(ops.array([[1, 0, 1, 0]]), 2))
    array([[1, 3, 0, 2]], dtype=int32)
    """
    n = keys.shape[-1]
    if n is not None and num_keys * n <= 2**31:
        positions = ops.arange(n, dtype="int32")
        return ops.sort(keys * n + positions, axis=-1) % n
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.argsort(keys, axis=-1, stable=True)
    import jax.numpy as jnp

    return jnp.argsort(keys, axis=-1, stable=True).astype("int32")


def take_rows(x, index):
    """`x` `(batch, heads, rows, ...)` at `index` `(batch, heads, n)` along
    axis 2 (`index` may have 1 for `batch` or `heads`, broadcast); plain
    autodiff (the gradient scatters).

    Whole rows move at once: TensorFlow's `tf.gather` with two batch
    dimensions (one, the batch, when `index` has 1 for `heads`), and on
    JAX `take_along_axis` with the index promised in bounds (no masking of
    out-of-range rows). Keras's `take_along_axis`
    on TensorFlow gathers element by element, the index broadcast to every
    element and the rows axis moved last and back.

    Example:
    >>> x = ops.reshape(ops.arange(6.0), (1, 1, 3, 2))
    >>> ops.convert_to_numpy(take_rows(x, ops.array([[[2, 0]]])))[0, 0]
    array([[4., 5.],
           [0., 1.]], dtype=float32)
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if index.shape[1] == 1:
            # One order for every head: the batch is the only batch
            # dimension of the gather, whose index XLA expands to (batch,
            # row) pairs, not (batch, head, row) triples repeated per head
            # (a constant of that size when the order is a constant).
            index = tf.broadcast_to(index[:, 0], tf.concat(
                [tf.shape(x)[:1], tf.shape(index)[2:]], 0))
            return tf.gather(x, index, axis=2, batch_dims=1)
        index = tf.broadcast_to(index, tf.concat(
            [tf.shape(x)[:2], tf.shape(index)[2:]], 0))
        return tf.gather(x, index, axis=2, batch_dims=2)
    index = ops.reshape(index, tuple(ops.shape(index))
                        + (1,) * (len(x.shape) - 3))
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        return jnp.take_along_axis(x, index, axis=2,
                                   mode="promise_in_bounds")
    return ops.take_along_axis(x, index, axis=2)
