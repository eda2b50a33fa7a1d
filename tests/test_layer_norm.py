"""The lean layer norm against Keras's LayerNormalization under autodiff."""

import keras
import numpy as np
import pytest

from keras_reformer.layers import LeanLayerNormalization
from tests.helpers import assert_close
from tests.helpers import value_and_grads


def twin_norms(epsilon=1e-6, **kwargs):
    """A lean norm and a Keras norm with the same random gamma and beta."""
    lean = LeanLayerNormalization(epsilon=epsilon, **kwargs)
    plain = keras.layers.LayerNormalization(epsilon=epsilon, **kwargs)
    rng = np.random.RandomState(0)
    for layer in (lean, plain):
        layer.build((2, 4, 12))
    for lean_weight, plain_weight in zip(lean.weights, plain.weights):
        value = rng.randn(*lean_weight.shape).astype("float32")
        lean_weight.assign(value)
        plain_weight.assign(value)
    return lean, plain


@pytest.mark.parametrize("epsilon", [1e-12, 1e-3])
def test_outputs_and_every_gradient_equal_keras_layer_norm(epsilon):
    lean, plain = twin_norms(epsilon)
    rng = np.random.RandomState(1)
    # Rows with large offsets and scales, where a careless formula loses
    # precision.
    x = (rng.randn(3, 5, 12) * rng.uniform(0.1, 20, (3, 5, 1))
         + rng.uniform(-50, 50, (3, 5, 1))).astype("float32")
    cotangent = rng.randn(3, 5, 12).astype("float32")
    results = [value_and_grads(
        lambda x, layer=layer: keras.ops.sum(layer(x) * cotangent),
        x, layer.trainable_variables) for layer in (lean, plain)]
    (lean_loss, lean_x, lean_w), (loss, x_grad, w_grads) = results
    assert_close(lean(x), plain(x), atol=1e-5)
    assert_close(lean_loss, loss, atol=1e-3, rtol=1e-5)
    assert_close(lean_x, x_grad, atol=1e-4, rtol=1e-4)
    for lean_grad, grad in zip(lean_w, w_grads):
        assert_close(lean_grad, grad, atol=1e-4, rtol=1e-5)


def test_mixed_precision_matches_keras_in_float32_statistics():
    lean, plain = twin_norms(dtype="mixed_bfloat16")
    rng = np.random.RandomState(2)
    x = rng.randn(2, 4, 12).astype("float32")
    cotangent = rng.randn(2, 4, 12).astype("float32")
    lean_out, plain_out = lean(x), plain(x)
    assert keras.backend.standardize_dtype(lean_out.dtype) == "bfloat16"
    assert_close(keras.ops.cast(lean_out, "float32"),
                 keras.ops.cast(plain_out, "float32"), atol=3e-2)
    (_, lean_grad, lean_w), (_, grad, w_grads) = [value_and_grads(
        lambda x, layer=layer: keras.ops.sum(
            keras.ops.cast(layer(x), "float32") * cotangent),
        x, layer.trainable_variables) for layer in (lean, plain)]
    # bfloat16 keeps 8 bits of mantissa: agree to a few percent of scale.
    scale = np.abs(grad).max()
    assert_close(lean_grad, grad, atol=0.05 * scale)
    for lean_w_grad, w_grad in zip(lean_w, w_grads):
        assert_close(lean_w_grad, w_grad, atol=0.05 * np.abs(w_grad).max())


def test_other_axes_fall_back_to_keras():
    lean, plain = twin_norms(axis=[1, 2])
    x = np.random.RandomState(3).randn(2, 4, 12).astype("float32")
    assert_close(lean(x), plain(x), atol=1e-5)


def test_config_round_trip():
    lean = LeanLayerNormalization(epsilon=1e-12, name="norm")
    clone = LeanLayerNormalization.from_config(lean.get_config())
    assert clone.epsilon == 1e-12 and clone.name == "norm"
    assert isinstance(keras.layers.deserialize(
        keras.layers.serialize(lean)), LeanLayerNormalization)
