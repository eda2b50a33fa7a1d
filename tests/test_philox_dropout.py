"""PhiloxDropout against dropout's definition and Keras's layer."""

import os
import sys

import keras
import numpy as np
import pytest

from keras_reformer.layers import PhiloxDropout
from tests.helpers import to_numpy
from tests.helpers import value_and_grads

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks")


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_kept_entries_are_scaled_and_as_frequent_as_one_minus_rate(rate):
    x = np.random.RandomState(0).rand(4, 100, 250).astype("float32") + 1.0
    out = to_numpy(PhiloxDropout(rate, seed=3)(x, training=True))
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / (1 - rate), rtol=1e-6)
    # Binomial: the kept fraction within 5 standard deviations.
    sigma = np.sqrt(rate * (1 - rate) / x.size)
    assert abs(kept.mean() - (1 - rate)) < 5 * sigma


def test_inference_and_rate_zero_return_the_inputs():
    x = np.random.RandomState(1).rand(2, 8).astype("float32")
    np.testing.assert_array_equal(to_numpy(PhiloxDropout(0.3)(x)), x)
    np.testing.assert_array_equal(
        to_numpy(PhiloxDropout(0.0)(x, training=True)), x)


def test_each_training_call_draws_a_new_mask_the_same_under_jit():
    layer = PhiloxDropout(0.5, seed=7)
    x = np.ones((64, 64), "float32")
    state = to_numpy(layer.seed_generator.state)
    first, second = (to_numpy(layer(x, training=True)) for _ in range(2))
    assert (first != second).mean() > 0.3
    # Keras's own layer advances its seed the same way.
    keras_layer = keras.layers.Dropout(0.5, seed=7)
    for _ in range(2):
        keras_layer(x, training=True)
    np.testing.assert_array_equal(to_numpy(layer.seed_generator.state),
                                  to_numpy(keras_layer.seed_generator.state))
    layer.seed_generator.state.assign(state)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        jitted = tf.function(lambda x: layer(x, training=True),
                             jit_compile=True)
    else:
        jitted = lambda x: layer(x, training=True)  # noqa: E731
    np.testing.assert_array_equal(to_numpy(jitted(x)), first)


def test_gradient_is_the_mask_divided_by_the_keep_probability():
    layer = PhiloxDropout(0.25, seed=2)
    x = np.random.RandomState(3).rand(3, 40).astype("float32") + 1.0
    cotangent = np.random.RandomState(4).randn(3, 40).astype("float32")
    state = to_numpy(layer.seed_generator.state)
    _, grad, _ = value_and_grads(
        lambda x: keras.ops.sum(layer(x, training=True) * cotangent), x, [])
    layer.seed_generator.state.assign(state)
    kept = to_numpy(layer(x, training=True)) != 0
    np.testing.assert_allclose(to_numpy(grad), cotangent * kept / 0.75,
                               rtol=1e-6)


def test_noise_shape_is_kerass_and_config_round_trips():
    layer = PhiloxDropout(0.5, noise_shape=(2, 1), seed=5)
    out = to_numpy(layer(np.ones((2, 30), "float32"), training=True))
    assert all(len(set(row.tolist())) == 1 for row in out)
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(clone, PhiloxDropout)
    assert (clone.rate, clone.noise_shape, clone.seed) == (0.5, (2, 1), 5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="benchmarks/dropout_xla.py measures TensorFlow")
def test_dropout_benchmark_measures_both_layers_dropping_at_the_rate():
    sys.path.insert(0, BENCHMARKS)
    import dropout_xla

    lines = dropout_xla.main(["--length", "64", "--width", "256",
                              "--rate", "0.5", "--repeats", "1"])
    assert [line["layer"] for line in lines] == ["keras_dropout",
                                                 "philox_dropout"]
    sigma = np.sqrt(0.25 / (64 * 256))
    for line in lines:
        assert abs(line["kept"] - 0.5) < 5 * sigma and line["ms"] > 0
