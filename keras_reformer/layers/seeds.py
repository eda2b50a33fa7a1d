"""Explicit per-call seeds, so recomputation redraws exactly the same numbers.

Random rotations and dropout masks inside a reversible block must be drawn
identically in the forward pass and in the backward recomputation. The layers
therefore take a seed *tensor* (shape `(2,)`) per call, derived from one
`keras.random.SeedGenerator` draw per training step.
"""

import keras
from keras import ops

_MAX_SEED = 2**31 - 1
# TensorFlow's raw random bits by Philox, named: the bits its default
# algorithm gives on the CPU, with or without XLA, but XLA's CPU compiler
# generates the default (`"auto_select"`) tens of times slower (15 ms for
# the 65,536 bits of 1,024 tokens' rotations in the layer table's
# configuration, against 0.4 ms named).
_ALGORITHM = "philox"


class TensorSeed(keras.random.SeedGenerator):
    """A seed generator that always hands out one given seed tensor.

    `keras.random` functions accept an int or a `SeedGenerator`; this lets
    them take a traced seed tensor instead (no state variable is created).

    Args:
        seed: integer tensor of shape `(2,)`.
    """

    def __init__(self, seed):
        self._seed = seed

    def next(self, ordered=True):
        return self._seed


def fold_seed(seed, index):
    """A new seed tensor for sub-stream `index` of `seed`.

    The new seed is random bits drawn from `seed` shifted by `index`, so
    folds compose without collisions: the block, branch and layer streams
    `fold_seed(fold_seed(seed, i), j)` are unrelated for every `(i, j)`
    (with a fold by addition, block `i`'s stream `j + 1` would be block
    `i + 1`'s stream `j`).

    Args:
        seed: integer tensor of shape `(2,)`.
        index: Python int, the sub-stream.

    Returns:
        Integer tensor of shape `(2,)` and the dtype of `seed`, with
        components in `[0, 2**31 - 1)`.

    Example:
    >>> seed = seed_tensor(3)
    >>> a = fold_seed(fold_seed(seed, 0), 1)
    >>> b = fold_seed(fold_seed(seed, 1), 0)
    >>> bool(keras.ops.any(a != b))
    True
    """
    shifted = seed + ops.convert_to_tensor([index + 1, 0], dtype=seed.dtype)
    if keras.backend.backend() != "tensorflow":
        return keras.random.randint((2,), 0, _MAX_SEED, dtype=seed.dtype,
                                    seed=TensorSeed(shifted))
    import tensorflow as tf

    # Raw stateless bits: the same with or without XLA (see random_normal).
    bits = tf.random.stateless_uniform(
        (2,), seed=tf.cast(tf.math.floormod(shifted, _MAX_SEED), tf.int32),
        minval=None, maxval=None, dtype=tf.uint32, alg=_ALGORITHM)
    return tf.cast(tf.math.floormod(tf.bitwise.right_shift(bits, 1),
                                    _MAX_SEED), seed.dtype)


def offset_seed(seed, offsets):
    """`seed` plus `offsets`, a pair of ints or integer tensors (loop
    indices): the seed of one part of a loop; None stays None."""
    if seed is None:
        return None
    return seed + ops.cast(ops.stack(offsets), seed.dtype)


def draw_seed(seed, seed_generator):
    """`seed` if given, else one fresh draw from `seed_generator`."""
    if seed is not None:
        return seed
    return seed_generator.next()


def seed_tensor(value):
    """A seed tensor (shape `(2,)`, the backend's seed dtype) from an int.

    Example:
    >>> from keras_reformer.layers import LSHSelfAttention
    >>> layer = LSHSelfAttention(2, 8, chunk_length=4, dropout=0.1)
    >>> x = keras.random.normal((1, 16, 16))
    >>> first = layer(x, training=True, seed=seed_tensor(7))
    >>> again = layer(x, training=True, seed=seed_tensor(7))
    >>> bool(keras.ops.all(first == again))  # the same rotations and dropout
    True
    """
    return keras.random.SeedGenerator(value).next()


def random_normal(shape, seed):
    """Standard normal numbers from a seed tensor, the same with or without XLA.

    TensorFlow's stateless normal sampler gives different numbers under XLA
    than in eager or graph mode for the same seed, while its raw random bits
    agree; on TensorFlow the numbers are therefore made from raw bits by the
    Box-Muller transform, so a model hashes alike with `jit_compile` on or
    off. Other backends use `keras.random.normal` (JAX is consistent).

    Args:
        shape: tuple of ints.
        seed: integer tensor of shape `(2,)`.

    Returns:
        float32 tensor of `shape`.
    """
    if keras.backend.backend() != "tensorflow":
        return keras.random.normal(shape, seed=TensorSeed(seed))
    import tensorflow as tf

    uniform = _uniform((2,) + tuple(shape), seed)
    radius = tf.sqrt(-2.0 * tf.math.log(uniform[0]))
    return radius * tf.cos(2.0 * 3.141592653589793 * uniform[1])


def dropout(x, rate, seed):
    """`keras.random.dropout` of `x` at `rate` from a seed tensor.

    On TensorFlow the kept entries are drawn from raw Philox bits
    (`_uniform`): Keras's dropout draws with TensorFlow's default algorithm,
    which XLA's CPU compiler generates tens of times slower (1.6 s against
    0.04 s for the 4,194,304 attention weights of 1,024 tokens in the layer
    table's LSH configuration).

    Args:
        x: float tensor.
        rate: float in `[0, 1)`, the fraction of entries set to zero (the
            others are divided by `1 - rate`).
        seed: integer tensor of shape `(2,)`.

    Returns:
        A tensor like `x`.

    Example:
    >>> kept = dropout(ops.ones((1000,)), 0.25, seed_tensor(1))
    >>> 0.7 < float(ops.mean(ops.cast(kept > 0, "float32"))) < 0.8
    True
    """
    if keras.backend.backend() != "tensorflow":
        return keras.random.dropout(x, rate, seed=TensorSeed(seed))
    import tensorflow as tf

    kept = _uniform(tf.shape(x), seed) >= rate
    return tf.where(kept, x / tf.cast(1.0 - rate, x.dtype),
                    tf.zeros((), x.dtype))


def _uniform(shape, seed):
    """TensorFlow: float32 uniforms strictly inside (0, 1) of `shape` (a
    tuple or a shape tensor) from the top 24 of raw Philox bits, the same
    with or without XLA."""
    import tensorflow as tf

    seed = tf.cast(tf.math.floormod(seed, _MAX_SEED), tf.int32)
    bits = tf.random.stateless_uniform(
        shape, seed=seed, minval=None, maxval=None, dtype=tf.uint32,
        alg=_ALGORITHM)
    return (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) / (
        2.0**24)
