"""Angular locality-sensitive hashing by random rotations.

A vector `x` goes to bucket `argmax([x R, -x R])` for a Gaussian matrix `R`
of `num_buckets / 2` columns: vectors at a small angle share a bucket with
high probability. Many buckets are *factorised*: `num_buckets = n0 * n1` takes
`b0 + n0 * b1` from two separate column blocks of `R`, which needs
`n0/2 + n1/2` columns instead of `n0 * n1 / 2`.
"""

from keras import ops


def auto_num_buckets(length, chunk_length):
    """The default bucket count for a sequence length.

    About `2 * length / chunk_length`, rounded down to a power of two (at
    least 2), so that a bucket holds about half a chunk. Above
    `2 * chunk_length` buckets it is factorised into two powers of two.

    Args:
        length: int, sequence length (padded to a multiple of the chunk).
        chunk_length: int.

    Returns:
        An even int, or a tuple `(n0, n1)` of powers of two.

    Example:
    >>> auto_num_buckets(4096, 64)
    128
    >>> auto_num_buckets(65536, 64)
    (32, 64)
    """
    exponent = max(1, (2 * length // chunk_length).bit_length() - 1)
    if 2**exponent <= 2 * chunk_length:
        return 2**exponent
    return (2 ** (exponent // 2), 2 ** (exponent - exponent // 2))


def bucket_factors(num_buckets):
    """`num_buckets` as a tuple of factors: `8 -> (8,)`, `(4, 8) -> (4, 8)`."""
    if isinstance(num_buckets, int):
        return (num_buckets,)
    return tuple(num_buckets)


def total_buckets(num_buckets):
    """The number of distinct buckets: the product of the factors."""
    total = 1
    for factor in bucket_factors(num_buckets):
        total *= factor
    return total


def rotation_columns(num_buckets):
    """Columns of the rotation matrix that `num_buckets` needs."""
    return sum(factor // 2 for factor in bucket_factors(num_buckets))


def hash_vectors(vectors, rotations, num_buckets):
    """Bucket ids of vectors for every hash round.

    Args:
        vectors: `(batch, heads, length, head_dim)`; no gradient flows
            through hashing.
        rotations: `(heads, head_dim, num_hashes, rotation_columns)`.
        num_buckets: int or tuple of factors.

    Returns:
        int32 tensor `(batch, heads, num_hashes, length)` with values in
        `[0, total_buckets(num_buckets))`.
    """
    # Hash in float32 whatever the compute dtype: a half-precision argmax
    # would move tokens between buckets. One round at a time, so that only
    # one round's rotated vectors exist at once (long sequences).
    vectors = ops.cast(ops.stop_gradient(vectors), "float32")
    rotations = ops.cast(rotations, "float32")
    rounds = []
    for index in range(rotations.shape[2]):
        rotated = ops.einsum("bhld,hdr->bhlr", vectors,
                             rotations[:, :, index])
        buckets, offset, product = 0, 0, 1
        for factor in bucket_factors(num_buckets):
            block = rotated[..., offset : offset + factor // 2]
            buckets = buckets + product * _argmax_of_both_signs(block)
            offset += factor // 2
            product *= factor
        rounds.append(buckets)
    return ops.stack(rounds, axis=2)


def _argmax_of_both_signs(block):
    """`argmax(concatenate([block, -block], -1), -1)` without the copy: the
    first maximum is in `block` unless `-block` holds a larger one."""
    highest = ops.cast(ops.argmax(block, axis=-1), "int32")[..., None]
    lowest = ops.cast(ops.argmin(block, axis=-1), "int32")[..., None]
    # Values at the arg-extremes rather than max/min reductions, which
    # Keras refuses on an empty batch.
    positive = ops.take_along_axis(block, highest, axis=-1) >= (
        -ops.take_along_axis(block, lowest, axis=-1))
    return ops.where(positive, highest, lowest + block.shape[-1])[..., 0]
