"""ChunkedFeedForward against the unchunked feed-forward."""

import numpy as np
import pytest
from keras import ops

from keras_reformer.layers import ChunkedFeedForward
from keras_reformer.layers.seeds import seed_tensor
from tests.helpers import assert_close
from tests.helpers import to_numpy
from tests.helpers import value_and_grads


def layer_and_inputs(length=45, chunk_length=8, dropout=0.0):
    layer = ChunkedFeedForward(32, chunk_length=chunk_length,
                               activation="gelu", dropout=dropout, seed=1)
    x = np.random.RandomState(0).randn(3, length, 12).astype("float32")
    layer.build(x.shape)
    # Non-zero biases so that they are checked too.
    layer.set_weights([w + 0.1 for w in layer.get_weights()])
    return layer, x


def unchunked(layer, x):
    kernel_1, bias_1, kernel_2, bias_2 = layer.trainable_variables
    hidden = ops.gelu(ops.matmul(x, kernel_1) + bias_1, approximate=False)
    return ops.matmul(hidden, kernel_2) + bias_2


@pytest.mark.parametrize("length", [45, 48, 3])
def test_equals_unchunked_feed_forward(length):
    layer, x = layer_and_inputs(length)
    kernel_1, bias_1, kernel_2, bias_2 = [to_numpy(w)
                                          for w in layer.get_weights()]
    hidden = x @ kernel_1 + bias_1
    from math import erf
    hidden = hidden * 0.5 * (1 + np.vectorize(erf)(hidden / np.sqrt(2)))
    expected = hidden @ kernel_2 + bias_2
    assert_close(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("length", [45, 3])
def test_gradients_equal_unchunked_autodiff(length):
    # 3 positions fit in one chunk: computed without the loop.
    layer, x = layer_and_inputs(length)
    weights = np.random.RandomState(1).randn(*x.shape).astype("float32")
    variables = layer.trainable_variables
    actual = value_and_grads(
        lambda x: ops.sum(layer(x, training=True) * weights), x, variables)
    expected = value_and_grads(
        lambda x: ops.sum(unchunked(layer, x) * weights), x, variables)
    assert_close(actual[0], expected[0], atol=1e-3, rtol=1e-5)
    assert_close(actual[1], expected[1], atol=1e-5)
    for got, want in zip(actual[2], expected[2]):
        assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_dropout_is_repeatable_per_seed_and_recomputed_in_backward():
    layer, x = layer_and_inputs(dropout=0.3)
    seed = seed_tensor(2)
    first = to_numpy(layer(x, training=True, seed=seed))
    np.testing.assert_array_equal(
        first, to_numpy(layer(x, training=True, seed=seed)))
    assert np.abs(first - to_numpy(layer(x))).max() > 1e-3
    # The gradient of sum(out * x_probe) wrt a weight, computed by the
    # chunked backward, must match finite differences of the same seeded
    # forward: the backward recomputes the same dropout masks.
    probe = np.random.RandomState(3).randn(*x.shape).astype("float32")
    bias = layer.trainable_variables[3]
    _, _, grads = value_and_grads(
        lambda x: ops.sum(layer(x, training=True, seed=seed) * probe), x,
        [bias])
    base = bias.numpy() if hasattr(bias, "numpy") else to_numpy(bias)
    epsilon = 1e-2
    numeric = []
    for i in range(2):
        shifted = base.copy()
        shifted[i] += epsilon
        bias.assign(shifted)
        up = np.sum(to_numpy(layer(x, training=True, seed=seed)) * probe)
        shifted[i] -= 2 * epsilon
        bias.assign(shifted)
        down = np.sum(to_numpy(layer(x, training=True, seed=seed)) * probe)
        numeric.append((up - down) / (2 * epsilon))
    bias.assign(base)
    assert_close(grads[0][:2], np.array(numeric), atol=2e-2, rtol=1e-3)


def test_one_chunk_drops_out_as_the_loops_first_chunk():
    layer, x = layer_and_inputs(length=16, dropout=0.3)
    seed = seed_tensor(4)
    looped = to_numpy(layer(x, training=True, seed=seed))
    direct = to_numpy(layer(x[:, :8], training=True, seed=seed))
    assert np.abs(direct - to_numpy(layer(x[:, :8]))).max() > 1e-3
    assert_close(direct, looped[:, :8], atol=1e-6)


def test_config_round_trip():
    layer, x = layer_and_inputs()
    clone = ChunkedFeedForward.from_config(layer.get_config())
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    assert_close(clone(x), layer(x), atol=0)
    with pytest.raises(ValueError, match="chunk_length"):
        ChunkedFeedForward(8, chunk_length=0)
