"""Attention inside chunks of a (possibly sorted) sequence, and its masks.

Shared by LSH attention (chunks of the bucket-sorted sequence) and by the
full-attention reference. Masks always use *original* token positions, so the
same rules hold whatever order the tokens were sorted into:

* causal: a query never sees a key at a later position;
* padding: a query never sees a padded key;
* self (shared-QK attention only): a token sees itself only when nothing else
  is allowed, through a finite score well below any real one.
"""

import keras
from keras import ops


def mask_values(dtype):
    """Scores for masked keys: `(mask_value, self_mask_value)` for `dtype`.

    Finite values (never `-inf`, which turns fully masked rows into NaN), as
    large as the dtype holds comfortably: float16's range ends at 65504.
    """
    if keras.backend.standardize_dtype(dtype) == "float16":
        return -1e4, -1e3
    return -1e9, -1e5


def masked_scores(scores, query_positions, key_positions, key_valid, causal,
                  mask_self, window=None):
    """Applies the causal, padding and self masks to attention scores.

    Args:
        scores: `(..., queries, keys)` dot products.
        query_positions: `(..., queries)` original positions of the queries.
        key_positions: `(..., keys)` original positions of the keys.
        key_valid: `(..., keys)` bool, False for padded keys.
        causal: bool, mask keys after the query.
        mask_self: bool, give a token's own key the self-mask score.
        window: None, or `(chunk_length, key_offsets)`: mask keys whose
            position-chunk is not the query's plus the key slot's offset
            `key_offsets` `(keys,)` (local attention: a neighbour that
            wrapped around, or repeats because there are few chunks, is
            masked).

    Returns:
        Scores of the same shape with masked entries replaced.
    """
    mask_value, self_mask_value = mask_values(scores.dtype)
    query_positions = ops.expand_dims(query_positions, -1)
    key_positions = ops.expand_dims(key_positions, -2)
    allowed = ops.expand_dims(key_valid, -2)
    if causal:
        allowed = ops.logical_and(allowed, query_positions >= key_positions)
    if window is not None:
        chunk_length, key_offsets = window
        offset = key_positions // chunk_length - query_positions // chunk_length
        allowed = ops.logical_and(allowed, ops.equal(offset, key_offsets))
    scores = ops.where(allowed, scores, ops.cast(mask_value, scores.dtype))
    if mask_self:
        scores = ops.where(
            ops.equal(query_positions, key_positions),
            ops.cast(self_mask_value, scores.dtype),
            scores,
        )
    return scores


def attend(queries, keys, values, scores_mask_fn, dropout_fn=None):
    """Softmax attention returning outputs and each query's logsumexp.

    Args:
        queries: `(..., queries, head_dim)`.
        keys: `(..., keys, head_dim)`, already scaled.
        values: `(..., keys, head_dim)`.
        scores_mask_fn: function applying the masks to the raw scores.
        dropout_fn: optional function applied to the attention weights.

    Returns:
        `(outputs, logsumexp)`, shapes `(..., queries, head_dim)` and
        `(..., queries)`, `logsumexp` in float32.
    """
    scores = scores_mask_fn(ops.einsum("...qd,...kd->...qk", queries, keys))
    scores = ops.cast(scores, "float32")
    # Normalise by the sum after subtracting the maximum rather than by
    # exp(logsumexp): with scores near the -1e5 self-mask value, float32
    # cannot hold logsumexp precisely enough for weights that sum to one.
    # `initial`: no score is below the mask value, and an empty batch has no
    # maximum to find (Keras raises on the max of an empty tensor otherwise).
    maximum = ops.stop_gradient(ops.max(
        scores, axis=-1, keepdims=True, initial=mask_values("float32")[0]))
    exponentials = ops.exp(scores - maximum)
    total = ops.sum(exponentials, axis=-1, keepdims=True)
    weights = exponentials / total
    logsumexp = maximum + ops.log(total)
    if dropout_fn is not None:
        weights = dropout_fn(weights)
    outputs = ops.einsum(
        "...qk,...kd->...qd", ops.cast(weights, values.dtype), values
    )
    return outputs, ops.squeeze(logsumexp, -1)


def look_adjacent(chunks, num_chunks_before, num_chunks_after,
                  ring_chunks=None):
    """Concatenates each chunk with its neighbours on a ring of chunks.

    Args:
        chunks: `(batch, heads, num_chunks, chunk_length, ...)`.
        num_chunks_before: how many preceding chunks to prepend.
        num_chunks_after: how many following chunks to append.
        ring_chunks: None (all chunks form the ring: the first chunk's
            predecessor is the last), or `(batch,)` ints: the first
            `ring_chunks[b]` chunks of row `b` form its ring and the others
            hold only padding (their own neighbours are never used).

    Returns:
        `(batch, heads, num_chunks, (1 + before + after) * chunk_length,
        ...)`, the earliest neighbour first.
    """
    parts = [_neighbours(chunks, offset, ring_chunks)
             for offset in range(-num_chunks_before, num_chunks_after + 1)]
    return ops.concatenate(parts, axis=3)


def _neighbours(chunks, offset, ring_chunks):
    """Chunk `u + offset` (modulo the ring) for every chunk `u`."""
    if offset == 0:
        return chunks
    shifted = ops.roll(chunks, -offset, axis=2)
    if ring_chunks is None:
        return shifted
    # The roll is right except where the step crosses the ring's end.
    ring = ops.maximum(ops.cast(ring_chunks, "int32"), 1)
    trailing = (1,) * (len(chunks.shape) - 3)
    chunk_index = ops.reshape(ops.arange(ops.shape(chunks)[2], dtype="int32"),
                              (1, 1, -1) + trailing)
    for k in range(abs(offset)):
        if offset < 0:
            crossing, source = k, (k + offset) % ring
        else:
            crossing, source = ring - offset + k, k % ring
        source_chunk = ops.take_along_axis(
            chunks, ops.reshape(source, (-1, 1, 1) + trailing), axis=2)
        crossing = ops.reshape(crossing * ops.ones_like(ring),
                               (-1, 1, 1) + trailing)
        shifted = ops.where(chunk_index == crossing, source_chunk, shifted)
    return shifted


def chunked_attention(queries, keys, values, positions, valid, chunk_length,
                      num_chunks_before, num_chunks_after, causal, mask_self,
                      dropout_fn=None, wrap_around=True, ring_chunks=None):
    """Attention within chunks of a sequence and their neighbours.

    The sequence axis (of length `T`, a multiple of `chunk_length`) is cut into
    chunks; queries of a chunk attend to the keys of the same chunk and of
    `num_chunks_before` / `num_chunks_after` neighbours.

    Args:
        queries, keys, values: `(batch, heads, T, head_dim)` in sequence order
            (for LSH: sorted order); keys already scaled.
        positions: `(batch, heads, T)` int, each token's original position.
        valid: `(batch, heads, T)` bool, False for padding.
        chunk_length: int.
        num_chunks_before, num_chunks_after: int.
        causal, mask_self: see `masked_scores`.
        dropout_fn: optional dropout on attention weights.
        wrap_around: bool; the first chunk's preceding chunk is the last one
            (LSH: the sorted sequence is cyclic). False masks such keys
            (local attention: neighbours are neighbours in position).
        ring_chunks: with `wrap_around`, None or `(batch,)` ints: the ring
            closes after this many chunks, the rest hold only padding (see
            `look_adjacent`).

    Returns:
        `(outputs, logsumexp)` of shapes `(batch, heads, T, head_dim)` and
        `(batch, heads, T)`.
    """
    batch, heads, length, head_dim = ops.shape(queries)
    num_chunks = length // chunk_length

    def split(x):
        return ops.reshape(
            x, (batch, heads, num_chunks, chunk_length) + tuple(ops.shape(x)[3:])
        )

    def adjacent(x):
        return look_adjacent(split(x), num_chunks_before, num_chunks_after,
                             ring_chunks)

    query_positions = split(positions)
    key_positions = adjacent(positions)
    key_valid = adjacent(valid)

    window = None if wrap_around else (chunk_length, ops.repeat(
        ops.arange(-num_chunks_before, num_chunks_after + 1, dtype="int32"),
        chunk_length))

    def mask_fn(scores):
        return masked_scores(
            scores, query_positions, key_positions, key_valid, causal,
            mask_self, window)

    outputs, logsumexp = attend(
        split(queries), adjacent(keys), adjacent(values), mask_fn,
        dropout_fn,
    )
    outputs = ops.reshape(outputs, (batch, heads, length, head_dim))
    logsumexp = ops.reshape(logsumexp, (batch, heads, length))
    return outputs, logsumexp
