"""`attend` and the LSH rounds' combination, whose backward passes are
written by hand, against plain autodiff of the textbook formulas."""

import numpy as np
import pytest
from keras import ops

from keras_reformer.layers.chunked_attention import attend
from keras_reformer.layers.chunked_attention import masked_scores
from keras_reformer.layers.lsh_self_attention import _combine_rounds
from tests.helpers import assert_close
from tests.helpers import value_and_grads


def _plain_attend(queries, keys, values, mask_fn, factors):
    scores = ops.cast(mask_fn(ops.einsum("...qd,...kd->...qk", queries,
                                         keys)), "float32")
    logsumexp = ops.logsumexp(scores, axis=-1)
    weights = ops.softmax(scores, axis=-1)
    if factors is not None:
        weights = weights * factors
    return ops.einsum("...qk,...kd->...qd", weights, values), logsumexp


@pytest.mark.parametrize("dropout", [False, True])
def test_attend_gradients_equal_autodiff_of_softmax(dropout):
    rng = np.random.RandomState(0)
    # (batch, heads, queries or keys, dim); scores large enough that the
    # softmax is far from uniform.
    queries, keys, values = (3 * rng.randn(2, 3, 6, 4).astype("float32")
                             for _ in range(3))
    positions = np.arange(6, dtype="int32")
    # Row 0 sees only some keys; row 1's queries 0 see only themselves (the
    # self-mask score), exercising the replaced entries' zero gradient.
    key_valid = np.ones((2, 1, 6), bool)
    key_valid[0, :, 4:] = False
    factors = (rng.rand(2, 3, 6, 6) > 0.3).astype("float32") / 0.7 if (
        dropout) else None
    out_weights = rng.randn(2, 3, 6, 4).astype("float32")
    lse_weights = rng.randn(2, 3, 6).astype("float32")

    def mask_fn(scores):
        return masked_scores(scores, positions, positions, key_valid,
                             causal=True, mask_self=True)

    def loss(attention):
        def fn(x):
            outputs, logsumexp = attention(x, keys * x[..., :1], values * x)
            return (ops.sum(outputs * out_weights)
                    + ops.sum(logsumexp * lse_weights))
        return fn

    dropout_fn = None if factors is None else (lambda w: w * factors)
    actual = value_and_grads(loss(lambda q, k, v: attend(
        q, k, v, mask_fn, dropout_fn)), queries, [])
    expected = value_and_grads(loss(lambda q, k, v: _plain_attend(
        q, k, v, mask_fn, factors)), queries, [])
    assert_close(actual[0], expected[0], atol=1e-3)
    assert_close(actual[1], expected[1], atol=1e-4)


def test_combined_rounds_gradients_equal_autodiff_of_softmax():
    rng = np.random.RandomState(1)
    outputs = rng.randn(2, 3, 4, 5, 6).astype("float32")
    logsumexp = 2 * rng.randn(2, 3, 4, 5).astype("float32")
    logsumexp[0, 0, :, 0] = -1e5  # every round only its self-mask score
    weights = rng.randn(2, 3, 5, 6).astype("float32")

    def loss(combine):
        return lambda x: ops.sum(combine(outputs * x,
                                         logsumexp + x[..., 0]) * weights)

    def plain(outputs, logsumexp):
        return ops.sum(outputs * ops.softmax(logsumexp, axis=-2)[..., None],
                       axis=-3)

    x = 1 + 0.1 * rng.randn(2, 3, 4, 5, 6).astype("float32")
    actual = value_and_grads(loss(_combine_rounds), x, [])
    expected = value_and_grads(loss(plain), x, [])
    assert_close(actual[0], expected[0], atol=1e-4)
    assert_close(actual[1], expected[1], atol=1e-4)
