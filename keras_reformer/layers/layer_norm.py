"""Layer normalisation whose gradient keeps only its input.

Autodiff of a layer norm keeps several activation-sized intermediates
(centred inputs, normalised inputs, scaled inputs) until the backward pass.
At half a million tokens each is hundreds of megabytes, and the reversible
stack recomputes a norm in every block's backward pass; this norm's
gradient is written out instead and needs only the input and two numbers
per row.
"""

import keras
from keras import ops

from keras_reformer.layers.custom_gradient import after
from keras_reformer.layers.custom_gradient import tensor_values
from keras_reformer.layers.custom_gradient import with_custom_gradient


@keras.saving.register_keras_serializable(package="keras_reformer")
class LeanLayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` with a memory-lean gradient.

    Same arguments, weights (`gamma`, `beta`) and outputs as Keras's layer.
    Over the last axis with centring and scaling (the defaults) its gradient
    is computed from the input and each row's mean and inverse standard
    deviation alone; any other configuration falls back to Keras's
    computation.

    Example:
    >>> norm = LeanLayerNormalization(epsilon=1e-12)
    >>> norm(keras.ops.ones((2, 3, 8))).shape
    (2, 3, 8)
    """

    def call(self, inputs):
        axis = self.axis if isinstance(self.axis, (list, tuple)) else [
            self.axis]
        last_axis = list(axis) in ([-1], [len(inputs.shape) - 1])
        if not (last_axis and self.center and self.scale) or (
                self.rms_scaling):
            return super().call(inputs)
        gamma, beta = tensor_values([self.gamma, self.beta])
        outputs = layer_norm(inputs, gamma, beta, self.epsilon)
        return ops.cast(outputs, self.compute_dtype)


def layer_norm(x, gamma, beta, epsilon):
    """Normalises `x` over its last axis, then scales and shifts.

    Computed in at least float32, returned in `x`'s dtype (as
    `keras.ops.layer_normalization`, with which it agrees to rounding).

    Args:
        x: `(..., features)`.
        gamma, beta: `(features,)`.
        epsilon: float added to the variance.

    Returns:
        A tensor shaped and typed like `x`.
    """
    input_dtype = keras.backend.standardize_dtype(x.dtype)
    compute_dtype = keras.backend.result_type(input_dtype, "float32")

    def forward(x, gamma, beta):
        wide = ops.cast(x, compute_dtype)
        mean, variance = ops.moments(wide, axes=[-1], keepdims=True)
        inverse_std = ops.rsqrt(variance + epsilon)
        scale = inverse_std * ops.cast(gamma, compute_dtype)
        outputs = wide * scale + (ops.cast(beta, compute_dtype)
                                  - mean * scale)
        return (ops.cast(outputs, input_dtype),), (
            x, gamma, mean, inverse_std)

    def backward(residuals, output_grads):
        grad = ops.cast(output_grads[0], compute_dtype)
        # Recomputed after the gradient exists, so that XLA neither merges
        # this with the forward pass's copy nor keeps that copy alive.
        x, gamma, mean, inverse_std = after(grad, list(residuals))
        normalised = (ops.cast(x, compute_dtype) - mean) * inverse_std
        reduce_axes = tuple(range(len(x.shape) - 1))
        gamma_grad = ops.sum(grad * normalised, axis=reduce_axes)
        beta_grad = ops.sum(grad, axis=reduce_axes)
        grad = grad * ops.cast(gamma, compute_dtype)
        x_grad = inverse_std * (
            grad - ops.mean(grad, axis=-1, keepdims=True)
            - normalised * ops.mean(grad * normalised, axis=-1,
                                    keepdims=True))
        return (ops.cast(x_grad, input_dtype),
                ops.cast(gamma_grad, gamma.dtype),
                ops.cast(beta_grad, beta.dtype))

    (outputs,) = with_custom_gradient(forward, backward)(x, gamma, beta)
    return outputs
