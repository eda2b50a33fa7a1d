"""Matrix products that use the CPU's bfloat16 kernels under XLA.

Under `mixed_bfloat16` a layer's product has bfloat16 operands and, from
`ops.matmul`, a bfloat16 result. XLA's compiler for the CPU runs such a
product as a float32 product with conversions around it, never faster than
float32. A product of bfloat16 operands with a float32 result runs on the
CPU's AVX512_BF16 kernels instead (`benchmarks/mixed_precision.py`), when
both operands lie in the product's own order. Measured: a product that
reads an operand transposed runs at float32's speed, and so does one of a
two-dimensional transposed copy; a copy with a batch axis of one, kept from
being folded back into the product by an optimization barrier, runs on the
bfloat16 kernels. So the gradients, which contract transposed operands
(`grads @ kernel^T`, `inputs^T @ grads`), are computed from such copies.
"""

import keras
from keras import ops

from keras_reformer.layers.custom_gradient import with_custom_gradient


def matmul(inputs, kernel):
    """`inputs @ kernel`, a `(..., k)` tensor times a `(k, n)` kernel.

    With bfloat16 operands under XLA (a TensorFlow function compiled with
    `jit_compile=True`; any JAX computation), the product and both its
    gradients accumulate in float32 on the CPU's bfloat16 kernels, and the
    results are rounded to bfloat16 (the inputs' dtype); otherwise this is
    `ops.matmul`.

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
    return with_custom_gradient(_matmul_forward, _matmul_backward)(
        inputs, kernel)[0]


def float32_matmul(left, right, transpose_right=False):
    """`left @ right`, or `left @ right^T`, over the last two axes, with a
    float32 result.

    Not differentiable on its own: for custom gradients that spell out
    their products (`chunked_attention`). With bfloat16 operands under XLA
    (see `matmul`), the product accumulates in float32 on the CPU's
    bfloat16 kernels; otherwise it is an einsum whose result is cast to
    float32. Under TensorFlow's XLA for the CPU, a reduction that reads
    such a product directly (`ops.max(float32_matmul(q, k))`) aborts the
    process: its YNNPACK emitter expects the result in the operands'
    dtype. Callers transform the product first (`chunked_attention`
    replaces masked scores before the softmax's maximum).

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
    equation = "...ij,...kj->...ik" if transpose_right else (
        "...ij,...jk->...ik")
    if not _bfloat16_kernels_apply(left, right):
        return ops.cast(ops.einsum(equation, left, right), "float32")
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        return jnp.einsum(equation, left, right,
                          preferred_element_type="float32")
    import tensorflow as tf

    return tf.raw_ops.BatchMatMulV3(x=left, y=right, Tout=tf.float32,
                                    adj_y=transpose_right)


def _bfloat16_kernels_apply(left, right):
    if not (keras.backend.standardize_dtype(left.dtype)
            == keras.backend.standardize_dtype(right.dtype) == "bfloat16"):
        return False
    if keras.backend.backend() == "jax":
        return True
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    # Outside XLA, TensorFlow has no CPU kernel for bfloat16 operands with
    # a float32 result.
    return not tf.executing_eagerly() and (
        control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()))


def _batched_product(left, right):
    """`left @ right` of bfloat16 `(1, i, j)` and `(1, j, k)` tensors,
    accumulated in and returned as float32 `(i, k)`."""
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        product = jnp.matmul(left, right, preferred_element_type="float32")
    else:
        import tensorflow as tf

        product = tf.raw_ops.BatchMatMulV3(x=left, y=right, Tout=tf.float32)
    return product[0]


def _transposed_copy(matrix):
    """`matrix^T` with a batch axis of one, laid out anew: an optimization
    barrier keeps XLA from folding the transpose into the product."""
    transposed = ops.transpose(matrix)[None]
    if keras.backend.backend() == "jax":
        import jax

        return jax.lax.optimization_barrier(transposed)
    from tensorflow.compiler.tf2xla.python import xla

    (copy,) = xla.optimization_barrier(transposed)
    return copy


def _matmul_forward(inputs, kernel):
    shape = ops.shape(inputs)
    rows = ops.reshape(inputs, (-1, shape[-1]))
    outputs = ops.cast(_batched_product(rows[None], kernel[None]),
                       inputs.dtype)
    outputs = ops.reshape(outputs, tuple(shape[:-1]) + (kernel.shape[-1],))
    return (outputs,), (rows, kernel)


def _matmul_backward(residuals, output_grads):
    rows, kernel = residuals
    shape = tuple(ops.shape(output_grads[0])[:-1]) + (kernel.shape[0],)
    grads = ops.reshape(ops.cast(output_grads[0], rows.dtype),
                        (-1, kernel.shape[-1]))
    inputs_grad = ops.reshape(ops.cast(_batched_product(
        grads[None], _transposed_copy(kernel)), rows.dtype), shape)
    kernel_grad = ops.cast(_batched_product(
        _transposed_copy(rows), grads[None]), kernel.dtype)
    return inputs_grad, kernel_grad
