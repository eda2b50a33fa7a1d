"""`products`: bfloat16 products accumulated in float32 under XLA."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_reformer.layers.products import float32_matmul
from keras_reformer.layers.products import matmul

RANDOM = np.random.RandomState(0)
INPUTS = RANDOM.randn(2, 24, 16).astype("float32")
KERNEL = RANDOM.randn(16, 40).astype("float32") / 4
GRADS = RANDOM.randn(2, 24, 40).astype("float32")
ON_TENSORFLOW = keras.backend.backend() == "tensorflow"


def bfloat16_values(array):
    """The float32 values of `array` rounded to bfloat16."""
    return ops.convert_to_numpy(ops.cast(ops.cast(array, "bfloat16"),
                                         "float32"))


def compiled(function, jit_compile, *args):
    """`function(*args)` as numpy arrays, compiled by XLA or not, and the
    HLO text of the compiled program ("" when not compiled)."""
    if ON_TENSORFLOW:
        import tensorflow as tf

        graph = tf.function(function, jit_compile=jit_compile)
        hlo = graph.experimental_get_compiler_ir(*args)(stage="hlo") if (
            jit_compile) else ""
    else:
        import jax

        graph = jax.jit(function) if jit_compile else function
        hlo = jax.jit(function).lower(*args).as_text(dialect="hlo") if (
            jit_compile) else ""
    results = graph(*args)
    if not isinstance(results, (list, tuple)):
        results = [results]
    return [ops.convert_to_numpy(ops.cast(x, "float32"))
            for x in results], hlo


def hlo_dots(hlo, result_dtype):
    """The HLO lines of dots with `result_dtype` ("f32", "bf16") results."""
    return [line for line in hlo.splitlines()
            if " dot(" in line and f"= {result_dtype}[" in line]


def product_and_gradients(inputs, kernel):
    """`matmul(inputs, kernel)` and the gradients of `sum(outputs * GRADS)`
    with respect to both."""
    if ON_TENSORFLOW:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch([inputs, kernel])
            outputs = matmul(inputs, kernel)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * GRADS)
        return [outputs, *tape.gradient(loss, [inputs, kernel])]
    import jax

    outputs, pullback = jax.vjp(matmul, inputs, kernel)
    return [outputs, *pullback(ops.cast(GRADS, outputs.dtype))]


@pytest.mark.parametrize("jit_compile", [True, False])
def test_bfloat16_product_and_gradients_equal_float32_of_the_same_values(
        jit_compile):
    inputs, kernel = bfloat16_values(INPUTS), bfloat16_values(KERNEL)
    grads = bfloat16_values(GRADS)
    expected = [inputs @ kernel, grads @ kernel.T,
                np.einsum("bli,blo->io", inputs, grads)]
    actual, hlo = compiled(product_and_gradients, jit_compile,
                           ops.cast(INPUTS, "bfloat16"),
                           ops.cast(KERNEL, "bfloat16"))
    for name, value, reference in zip(
            ["outputs", "inputs' gradient", "kernel's gradient"], actual,
            expected):
        assert value.shape == reference.shape, name
        # Accumulated in float32, rounded once to bfloat16 (8 bits).
        np.testing.assert_allclose(
            value, reference, rtol=2**-7, atol=2**-7 * np.abs(
                reference).max(), err_msg=name)
    if jit_compile:
        # All three products have float32 results (of the bfloat16
        # operands: the program converts none of them).
        assert len(hlo_dots(hlo, "f32")) == 3, hlo
        assert not hlo_dots(hlo, "bf16"), hlo


def test_float32_products_are_plain_products():
    (actual,), hlo = compiled(matmul, True, ops.convert_to_tensor(INPUTS),
                              ops.convert_to_tensor(KERNEL))
    np.testing.assert_allclose(actual, INPUTS @ KERNEL, rtol=1e-5,
                               atol=1e-5)
    assert len(hlo_dots(hlo, "f32")) == 1, hlo


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("transpose_right", [False, True])
def test_float32_matmul_equals_numpy(dtype, jit_compile, transpose_right):
    left = bfloat16_values(RANDOM.randn(3, 2, 5, 7))
    right = bfloat16_values(RANDOM.randn(3, 2, 7, 4))
    if transpose_right:
        right = np.swapaxes(right, -1, -2).copy()
    (actual,), hlo = compiled(
        lambda a, b: float32_matmul(a, b, transpose_right=transpose_right),
        jit_compile, ops.cast(left, dtype), ops.cast(right, dtype))
    expected = left @ (np.swapaxes(right, -1, -2) if transpose_right
                       else right)
    # Exactly representable operands: accumulated in float32 on the
    # bfloat16 kernels, the result stays float32; TensorFlow's own kernels
    # (outside XLA) round a bfloat16 product to bfloat16 (8 bits) first.
    rounded = dtype == "bfloat16" and ON_TENSORFLOW and not jit_compile
    tolerance = 2**-7 * np.abs(expected).max() if rounded else 1e-5
    np.testing.assert_allclose(actual, expected, rtol=tolerance,
                               atol=tolerance)
    if jit_compile:
        assert len(hlo_dots(hlo, "f32")) == 1, hlo
