"""`products`: bfloat16 products accumulated in float32 under XLA."""

import keras
import numpy as np
import pytest

from keras_reformer.layers.products import float32_matmul
from keras_reformer.layers.products import matmul

tf = pytest.importorskip("tensorflow")
if keras.backend.backend() != "tensorflow":
    pytest.skip("the bfloat16 kernels are TensorFlow's XLA path",
                allow_module_level=True)

RANDOM = np.random.RandomState(0)
INPUTS = RANDOM.randn(2, 24, 16).astype("float32")
KERNEL = RANDOM.randn(16, 40).astype("float32") / 4
GRADS = RANDOM.randn(2, 24, 40).astype("float32")


def bfloat16_values(array):
    """The float32 values of `array` rounded to bfloat16."""
    return tf.cast(tf.cast(array, tf.bfloat16), tf.float32).numpy()


def products_and_gradients(inputs, kernel, jit_compile):
    """`matmul`'s outputs and the gradients of `sum(outputs * GRADS)`,
    compiled by XLA or not, plus the compiled program's HLO text."""

    def step(inputs, kernel):
        with tf.GradientTape() as tape:
            tape.watch([inputs, kernel])
            outputs = matmul(inputs, kernel)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * GRADS)
        return [outputs, *tape.gradient(loss, [inputs, kernel])]

    function = tf.function(step, jit_compile=jit_compile)
    inputs, kernel = (tf.cast(inputs, tf.bfloat16),
                      tf.cast(kernel, tf.bfloat16))
    results = [tf.cast(x, tf.float32).numpy() for x in
               function(inputs, kernel)]
    hlo = function.experimental_get_compiler_ir(inputs, kernel)(
        stage="hlo") if jit_compile else ""
    return results, hlo


@pytest.mark.parametrize("jit_compile", [True, False])
def test_bfloat16_product_and_gradients_equal_float32_of_the_same_values(
        jit_compile):
    inputs, kernel = bfloat16_values(INPUTS), bfloat16_values(KERNEL)
    grads = bfloat16_values(GRADS)
    expected = [inputs @ kernel, grads @ kernel.T,
                np.einsum("bli,blo->io", inputs, grads)]
    actual, hlo = products_and_gradients(INPUTS, KERNEL, jit_compile)
    for name, value, reference in zip(
            ["outputs", "inputs' gradient", "kernel's gradient"], actual,
            expected):
        assert value.shape == reference.shape, name
        # Accumulated in float32, rounded once to bfloat16 (8 bits).
        np.testing.assert_allclose(
            value, reference, rtol=2**-7, atol=2**-7 * np.abs(
                reference).max(), err_msg=name)
    if jit_compile:
        # All three products: bfloat16 operands, float32 results.
        assert len(set(hlo_bfloat16_dots(hlo))) >= 3, hlo


def hlo_bfloat16_dots(hlo):
    """The HLO lines of dots with a float32 result of bfloat16 operands."""
    return [line for line in hlo.splitlines()
            if " dot(" in line and "= f32[" in line
            and line.split(" dot(")[1].count("bf16[") == 2]


def test_float32_products_are_plain_products():
    function = tf.function(matmul, jit_compile=True)
    actual = function(tf.constant(INPUTS), tf.constant(KERNEL)).numpy()
    np.testing.assert_allclose(actual, INPUTS @ KERNEL, rtol=1e-5,
                               atol=1e-5)
    assert not hlo_bfloat16_dots(function.experimental_get_compiler_ir(
        tf.constant(INPUTS), tf.constant(KERNEL))(stage="hlo"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("transpose_right", [False, True])
def test_float32_matmul_equals_numpy(dtype, jit_compile, transpose_right):
    left = bfloat16_values(RANDOM.randn(3, 2, 5, 7))
    right = bfloat16_values(RANDOM.randn(3, 2, 7, 4))
    if transpose_right:
        right = np.swapaxes(right, -1, -2).copy()
    function = tf.function(
        lambda a, b: float32_matmul(a, b, transpose_right=transpose_right),
        jit_compile=jit_compile)
    actual = function(tf.cast(left, dtype), tf.cast(right, dtype))
    assert actual.dtype == tf.float32
    expected = left @ (np.swapaxes(right, -1, -2) if transpose_right
                       else right)
    # Exactly representable operands: under XLA the float32 accumulation
    # keeps the float32 result; TensorFlow's own bfloat16 kernels round it
    # to bfloat16 (8 bits) before the cast.
    rounded = dtype == "bfloat16" and not jit_compile
    tolerance = 2**-7 * np.abs(expected).max() if rounded else 1e-5
    np.testing.assert_allclose(actual.numpy(), expected, rtol=tolerance,
                               atol=tolerance)
