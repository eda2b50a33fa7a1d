"""Attention inside chunks of a (possibly sorted) sequence, and its masks.

Shared by LSH attention (chunks of the bucket-sorted sequence), local
attention (chunks in order) and full attention (masks and softmax). Masks
always use *original* token positions, so the same rules hold whatever order
the tokens were sorted into:

* causal: a query never sees a key at a later position;
* padding: a query never sees a padded key;
* self (shared-QK attention only): a token sees itself only when nothing else
  is allowed, through a finite score well below any real one.
"""

import keras
from keras import ops

from keras_reformer.layers.custom_gradient import with_custom_gradient
from keras_reformer.layers.products import float32_matmul
from keras_reformer.layers.recomputed_loop import recomputed_loop


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
        # Only an allowed copy of the token itself: a masked one (padding, a
        # repeated chunk) stays masked.
        scores = ops.where(
            ops.logical_and(ops.equal(query_positions, key_positions),
                            allowed),
            ops.cast(self_mask_value, scores.dtype),
            scores,
        )
    return scores


def attend(queries, keys, values, scores_mask_fn, dropout_fn=None):
    """Softmax attention returning outputs and each query's logsumexp.

    Differentiated by its own backward pass (`_attention_backward`), whose
    sums over keys and feature dimensions are matrix products, where plain
    autodiff of the softmax would sum products of score-sized tensors.

    Args:
        queries: `(..., queries, head_dim)`.
        keys: `(..., keys, head_dim)`, already scaled.
        values: `(..., keys, head_dim)`.
        scores_mask_fn: function applying the masks to the raw scores
            (replacing masked entries by constants, as `masked_scores`).
        dropout_fn: optional function applied to the attention weights
            (elementwise: each weight scaled by a factor drawn once).

    Returns:
        `(outputs, logsumexp)`, shapes `(..., queries, head_dim)` and
        `(..., queries)`, `logsumexp` in float32.
    """
    shape = tuple(ops.shape(queries)[:-1]) + (ops.shape(keys)[-2],)
    # The masks as scores: zero where the raw score is kept, the constant
    # that replaces it elsewhere.
    replacements = scores_mask_fn(ops.zeros(shape, queries.dtype))
    masks = [replacements]
    if dropout_fn is not None:
        masks.append(dropout_fn(ops.ones(shape, "float32")))
    return with_custom_gradient(_attention_forward, _attention_backward)(
        queries, keys, values, *masks)


def _attention_forward(queries, keys, values, replacements, factors=None):
    """`attend`'s outputs and what `_attention_backward` needs; `factors`:
    None, or the dropout's factor for each weight."""
    kept, weights, logsumexp = _softmax(queries, keys, replacements)
    dropped = weights if factors is None else weights * factors
    outputs = ops.cast(float32_matmul(ops.cast(dropped, values.dtype),
                                      values), values.dtype)
    residuals = (queries, keys, values, kept, factors, weights, outputs)
    return (outputs, logsumexp), residuals


def _softmax(queries, keys, replacements):
    """The attention weights (float32) of the scores with masked entries
    replaced (`replacements`, see `attend`): `(kept, weights, logsumexp)`,
    `kept` True where the raw score was kept."""
    kept = ops.equal(replacements, ops.zeros((), replacements.dtype))
    scores = ops.where(
        kept, float32_matmul(queries, keys, transpose_right=True),
        ops.cast(replacements, "float32"))
    # Normalise by the sum after subtracting the maximum rather than by
    # exp(logsumexp): with scores near the -1e5 self-mask value, float32
    # cannot hold logsumexp precisely enough for weights that sum to one.
    # `initial`: no score is below the mask value, and an empty batch has no
    # maximum to find (Keras raises on the max of an empty tensor otherwise).
    maximum = ops.max(scores, axis=-1, keepdims=True,
                      initial=mask_values("float32")[0])
    exponentials = ops.exp(scores - maximum)
    total = ops.sum(exponentials, axis=-1, keepdims=True)
    logsumexp = ops.squeeze(maximum + ops.log(total), -1)
    return kept, exponentials / total, logsumexp


def _attention_backward(residuals, output_grads):
    """Gradients of `attend` with respect to its queries, keys and values.

    With weights `P` (before dropout), `dP` the gradient reaching them and
    `g` that of the logsumexp (None: zero), the scores' gradient is `P *
    (dP - sum(P * dP) + g)` where a score was kept, zero where a mask
    replaced it. `sum(P * dP)` over the keys is the outputs' product with
    their gradient (a sum over the fewer feature dimensions); so `P` may
    also be a share of a softmax over more keys than these (scaled
    weights), with the outputs and their gradient those of that whole
    softmax.
    """
    queries, keys, values, kept, factors, weights, outputs = residuals
    output_grad, logsumexp_grad = output_grads
    dropped = weights if factors is None else weights * factors
    # The value and key gradients read their left operand transposed, which
    # the CPU's bfloat16 kernels do not take (see `products`): einsums.
    value_grad = ops.einsum("...qk,...qd->...kd",
                            ops.cast(dropped, values.dtype), output_grad)
    weight_grad = float32_matmul(output_grad, values, transpose_right=True)
    if factors is not None:
        weight_grad = weight_grad * factors
    through_weights = ops.einsum(
        "...qd,...qd->...q", ops.cast(output_grad, "float32"),
        ops.cast(outputs, "float32"))
    if logsumexp_grad is not None:
        through_weights = through_weights - ops.cast(logsumexp_grad,
                                                     "float32")
    score_grad = weights * (weight_grad - ops.expand_dims(through_weights,
                                                          -1))
    score_grad = ops.cast(ops.where(kept, score_grad, 0.0), queries.dtype)
    query_grad = ops.cast(float32_matmul(score_grad, keys), queries.dtype)
    key_grad = ops.einsum("...qk,...qd->...kd", score_grad, queries)
    masks_grads = (None,) if factors is None else (None, None)
    return (query_grad, key_grad, value_grad) + masks_grads


def look_adjacent(chunks, num_chunks_before, num_chunks_after):
    """Concatenates each chunk with its neighbours, the last chunk's
    successor being the first (callers mask what must not wrap around).

    Args:
        chunks: `(batch, heads, num_chunks, chunk_length, ...)`.
        num_chunks_before: how many preceding chunks to prepend.
        num_chunks_after: how many following chunks to append.

    Returns:
        `(batch, heads, num_chunks, (1 + before + after) * chunk_length,
        ...)`, the earliest neighbour first.
    """
    parts = [chunks if offset == 0 else ops.roll(chunks, -offset, axis=2)
             for offset in range(-num_chunks_before, num_chunks_after + 1)]
    return ops.concatenate(parts, axis=3)


def chunked_attention(queries, keys, values, query_positions, key_positions,
                      key_valid, chunk_length, causal, mask_self,
                      dropout_fn=None, window=None):
    """Attention of each chunk of queries to its own window of keys.

    Queries, in some order (for LSH: sorted), are cut into chunks of
    `chunk_length`; chunk `u` attends to the `u`-th window of keys, `W`
    times as long as a chunk (its neighbours, gathered by the caller).

    Args:
        queries: `(batch, heads, T, head_dim)`, `T` a multiple of
            `chunk_length`.
        keys, values: `(batch, heads, T * W, head_dim)`, keys already scaled:
            window after window.
        query_positions: `(batch, heads, T)` int, original positions.
        key_positions: `(batch, heads, T * W)` int, original positions.
        key_valid: `(batch, heads, T * W)` bool, False for padding.
        chunk_length: int.
        causal, mask_self, window: see `masked_scores`.
        dropout_fn: optional dropout on attention weights.

    Returns:
        `(outputs, logsumexp)` of shapes `(batch, heads, T, head_dim)` and
        `(batch, heads, T)`.
    """
    split, mask_fn = _chunks(queries, query_positions, key_positions,
                             key_valid, chunk_length, causal, mask_self,
                             window)
    outputs, logsumexp = attend(
        split(queries), split(keys), split(values), mask_fn, dropout_fn)
    return (ops.reshape(outputs, ops.shape(queries)),
            ops.reshape(logsumexp, ops.shape(query_positions)))


def chunked_attention_grads(queries, keys, values, query_positions,
                            key_positions, key_valid, chunk_length, causal,
                            mask_self, weight_scales, outputs, output_grad,
                            dropout_fn=None, window=None):
    """Gradients of `chunked_attention`'s queries, keys and values when each
    query's weights are a share of a softmax over more keys (LSH: every
    round's), recomputed from the scores alone.

    The weights are `chunked_attention`'s times `weight_scales` (each
    query's share); `outputs` and `output_grad` are those of the whole
    softmax. So the chunks' own outputs are not needed: the backward of a
    flash attention over several rounds of chunked keys.

    Args:
        queries, keys, values, query_positions, key_positions, key_valid,
            chunk_length, causal, mask_self, dropout_fn, window: as
            `chunked_attention` (the same `dropout_fn` and seed draw the
            same factors).
        weight_scales: `(batch, heads, T)` float32.
        outputs, output_grad: `(batch, heads, T, head_dim)`.

    Returns:
        `(query_grad, key_grad, value_grad)`, shaped like the inputs.
    """
    split, mask_fn = _chunks(queries, query_positions, key_positions,
                             key_valid, chunk_length, causal, mask_self,
                             window)
    chunks = [split(x) for x in (queries, keys, values)]
    shape = tuple(ops.shape(chunks[0])[:-1]) + (ops.shape(chunks[1])[-2],)
    replacements = mask_fn(ops.zeros(shape, queries.dtype))
    factors = None if dropout_fn is None else dropout_fn(
        ops.ones(shape, "float32"))
    kept, weights, _ = _softmax(chunks[0], chunks[1], replacements)
    weights = weights * ops.expand_dims(split(weight_scales), -1)
    grads = _attention_backward(
        (*chunks, kept, factors, weights, split(outputs)),
        (split(output_grad), None))
    return tuple(ops.reshape(grad, ops.shape(x)) for grad, x in zip(
        grads[:3], (queries, keys, values)))


def _chunks(queries, query_positions, key_positions, key_valid,
            chunk_length, causal, mask_self, window):
    """`(split, mask_fn)` of `chunked_attention`: `split` cuts a `(batch,
    heads, n, ...)` tensor into the query chunks' parts, `mask_fn` masks
    the chunks' scores."""
    batch, heads, length = ops.shape(queries)[:3]
    num_chunks = length // chunk_length

    def split(x):
        return ops.reshape(
            x, (batch, heads, num_chunks, -1) + tuple(ops.shape(x)[3:]))

    query_positions = split(query_positions)
    key_positions = split(key_positions)
    key_valid = split(key_valid)

    def mask_fn(scores):
        return masked_scores(
            scores, query_positions, key_positions, key_valid, causal,
            mask_self, window)

    return split, mask_fn


def run_of(x, s, size):
    """Entries `s * size` to `(s + 1) * size` of `x` `(batch, heads, n)`."""
    return ops.slice(x, [0, 0, s * size], tuple(ops.shape(x)[:2]) + (size,))


def dividing_runs(runs, num_chunks):
    """The largest number of runs, at most `runs`, that divides
    `num_chunks` into equal runs; 1 when `num_chunks` is unknown (a tensor:
    the length is unknown while tracing)."""
    if not isinstance(num_chunks, int):
        return 1
    return max(n for n in range(1, min(runs, num_chunks) + 1)
               if num_chunks % n == 0)


def attention_in_runs(attend_run, inputs, layout, runs, chunk_length,
                      seed=None, slicing=None, result_axes=(2, 2)):
    """Chunked attention over `slots` query slots in `runs` equal runs of
    chunks, one after another, each recomputed in the backward pass
    (`recomputed_loop`): the scores and key windows alive at once shrink
    `runs`-fold.

    Args:
        attend_run: `attend_run(s, run, inputs, layout, seed)` returning
            run `s`'s results for query slots `s * run` to `(s + 1) * run`,
            a tuple of tensors whose `result_axes` hold those slots (LSH:
            outputs `(batch, heads, run, head_dim)` and logsumexp `(batch,
            heads, run)`); `inputs` are the run's `step_views`, `seed` is
            None or the seed tensor.
        inputs: list of float tensors (the differentiated ones).
        layout: list of integer or bool tensors (positions, validity), the
            first `(batch, heads, slots)`.
        runs: int, the runs wanted: the largest number of runs not above
            it that divides the `slots / chunk_length` chunks is used (one
            run when the length is unknown while tracing).
        chunk_length: int.
        seed: None (no dropout) or a seed tensor.
        slicing: see `step_views`: whole inputs (LSH gathers rows from the
            whole projections) or slices (local attention: neighbouring
            chunks are one slice of the padded inputs).
        result_axes: the axis of each result that holds the run's slots.

    Returns:
        The results of the whole sequence, each the runs' results laid end
        to end along its axis of `result_axes`.
    """
    slots = ops.shape(layout[0])[2]
    runs = dividing_runs(runs, slots // chunk_length)
    run = slots // runs
    return recomputed_loop(
        lambda s, views, layout, seed: attend_run(s, run, views, layout,
                                                  seed),
        inputs, runs, run, slicing=slicing, result_axes=result_axes,
        layout=tuple(layout), seed=seed)
