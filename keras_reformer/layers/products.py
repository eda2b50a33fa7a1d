"""Matrix products that use the CPU's bfloat16 kernels under XLA.

Under `mixed_bfloat16` a layer's product has bfloat16 operands and, from
`ops.matmul`, a bfloat16 result. TensorFlow's XLA compiler for the CPU runs
such a product as a float32 product with conversions around it, never
faster than float32. A product of bfloat16 operands with a float32 result
runs on the CPU's AVX512_BF16 kernels instead (1.6-1.9x float32's speed on
a CPU that has them: `benchmarks/mixed_precision.py`), when its left operand
is not transposed; the weight gradient `inputs^T @ grads` is therefore
computed from a transposed copy of the inputs that XLA may not fold back
into the product (an optimization barrier).
"""

import keras
from keras import ops

from keras_reformer.layers.custom_gradient import with_custom_gradient


def matmul(inputs, kernel):
    """`inputs @ kernel`, a `(..., k)` tensor times a `(k, n)` kernel.

    With bfloat16 operands inside a TensorFlow function compiled by XLA,
    the product and both its gradients accumulate in float32 on the CPU's
    bfloat16 kernels, and the results are rounded to bfloat16 (the inputs'
    dtype); otherwise this is `ops.matmul`.

    Args:
        inputs: tensor `(..., k)`.
        kernel: tensor `(k, n)` of the inputs' dtype.

    Returns:
        A tensor `(..., n)` of the inputs' dtype.

    Example:
    >>> matmul(ops.ones((2, 3, 4)), ops.ones((4, 5))).shape
    (2, 3, 5)
    """
    if not _bfloat16_kernels_apply(inputs, kernel):
        return ops.matmul(inputs, kernel)
    return with_custom_gradient(_bfloat16_forward, _bfloat16_backward)(
        inputs, kernel)[0]


def float32_matmul(left, right, transpose_right=False):
    """`left @ right`, or `left @ right^T`, over the last two axes, with a
    float32 result.

    Not differentiable on its own: for custom gradients that spell out
    their products (`chunked_attention`). With bfloat16 operands inside a
    TensorFlow function compiled by XLA, the product accumulates in float32
    on the CPU's bfloat16 kernels; otherwise it is an einsum (whose result
    is cast to float32).

    Args:
        left: tensor `(..., i, j)`.
        right: tensor `(..., j, k)`, or `(..., k, j)` if `transpose_right`,
            of the left one's dtype, the same batch axes.
        transpose_right: bool, whether to transpose `right`.

    Returns:
        A float32 tensor `(..., i, k)`.

    Example:
    >>> float32_matmul(ops.ones((3, 2, 4)), ops.ones((3, 5, 4)),
    ...                transpose_right=True).shape
    (3, 2, 5)
    """
    if _bfloat16_kernels_apply(left, right):
        return _product(left, right, transpose_right)
    equation = "...ij,...kj->...ik" if transpose_right else (
        "...ij,...jk->...ik")
    return ops.cast(ops.einsum(equation, left, right), "float32")


def _bfloat16_kernels_apply(inputs, kernel):
    if keras.backend.backend() != "tensorflow" or not (
            keras.backend.standardize_dtype(inputs.dtype)
            == keras.backend.standardize_dtype(kernel.dtype) == "bfloat16"):
        return False
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    # Outside XLA, TensorFlow has no CPU kernel for bfloat16 operands with
    # a float32 result.
    return not tf.executing_eagerly() and (
        control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()))


def _product(left, right, transpose_right=False):
    """`left @ right` (`right` transposed if asked) of bfloat16 matrices,
    accumulated in and returned as float32."""
    import tensorflow as tf

    return tf.raw_ops.BatchMatMulV3(x=left, y=right, Tout=tf.float32,
                                    adj_y=transpose_right)


def _weight_gradient(rows, grads):
    """`rows^T @ grads` in float32, from a transposed copy of `rows` that
    XLA may not fold back into the product. The copy and product carry a
    batch axis of one: XLA:CPU takes a two-dimensional product of such a
    copy back to float32's speed."""
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    (transposed,) = xla.optimization_barrier(tf.transpose(rows)[None])
    return _product(transposed, grads[None])[0]


def _bfloat16_forward(inputs, kernel):
    import tensorflow as tf

    rows = tf.reshape(inputs, (-1, tf.shape(inputs)[-1]))
    outputs = _product(rows, kernel)
    outputs = tf.reshape(tf.cast(outputs, inputs.dtype), tf.concat(
        [tf.shape(inputs)[:-1], tf.shape(kernel)[-1:]], 0))
    return (outputs,), (rows, kernel, tf.shape(inputs))


def _bfloat16_backward(residuals, output_grads):
    import tensorflow as tf

    rows, kernel, shape = residuals
    grads = tf.reshape(tf.cast(output_grads[0], rows.dtype),
                       (-1, tf.shape(kernel)[-1]))
    inputs_grad = tf.reshape(tf.cast(_product(
        grads, kernel, transpose_right=True), rows.dtype), shape)
    kernel_grad = tf.cast(_weight_gradient(rows, grads), kernel.dtype)
    return inputs_grad, kernel_grad
