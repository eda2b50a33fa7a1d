"""Projection sublayers and the float kernels the memory-lean paths use.

The attention and feed-forward layers hold their projections as
`keras.layers.EinsumDense` sublayers, so that keras-hub's `enable_lora` and
Keras's `quantize("int8")` find them, but compute with their kernels as
plain tensors (head groups, runs of chunks and recomputed loops slice the
kernels and pass them through custom gradients). `effective_kernel` gives
that tensor: the kernel the sublayer applies, LoRA and int8 included.
"""

import keras
from keras import ops

from keras_reformer.layers.custom_gradient import tensor_values


def projection(equation, output_shape, initializer, index, name, dtype,
               bias_axes=None, fan_axes=None):
    """An `EinsumDense` projection of a layer that has several.

    Args:
        equation, output_shape, bias_axes: see `keras.layers.EinsumDense`.
        initializer: the layer's kernel initializer.
        index: int, which of the layer's projections this is: an
            initializer with an integer seed is reseeded with `seed + index`,
            and an unseeded one is cloned (an initializer instance called
            twice returns the same values: the projections must differ).
        name: the sublayer's name.
        dtype: the dtype policy.
        fan_axes: None, or `(input_axes, output_axes)` of the kernel that
            a variance-scaling initializer without axes of its own computes
            its fans over (instead of `EinsumDense`'s contracted and output
            axes).

    Returns:
        An unbuilt `keras.layers.EinsumDense`.
    """
    config = initializer.get_config()
    if isinstance(config.get("seed"), int):
        config["seed"] += index
    if fan_axes is not None and isinstance(
            initializer, keras.initializers.VarianceScaling) and (
            config.get("input_axes") is None):
        config["input_axes"], config["output_axes"] = fan_axes
    return keras.layers.EinsumDense(
        equation, output_shape, bias_axes=bias_axes,
        kernel_initializer=type(initializer).from_config(config),
        dtype=dtype, name=name)


def effective_kernel(dense, dtype):
    """The float kernel `dense` applies, as a tensor of `dtype`.

    That is its kernel, dequantized (`int8 kernel / kernel_scale`) when the
    layer is quantized to int8, plus `lora_alpha / lora_rank * A @ B` when
    LoRA is enabled. Gradients reach whichever of these are variables (the
    adapters only, after `enable_lora`).

    Args:
        dense: a built `keras.layers.EinsumDense`.
        dtype: the dtype of the result.

    Returns:
        A tensor of the kernel's shape.

    Example:
    >>> dense = keras.layers.EinsumDense("ab,bc->ac", output_shape=3)
    >>> dense.build((None, 2))
    >>> dense.enable_lora(1)
    >>> effective_kernel(dense, "float32").shape
    (2, 3)
    """
    mode = dense.quantization_mode
    if mode is None:
        kernel = dense.kernel  # the kernel plus the LoRA delta, if enabled
        if isinstance(kernel, keras.Variable):
            (kernel,) = tensor_values([kernel])
        return ops.cast(kernel, dtype)
    if mode != "int8":
        raise ValueError(
            f"{dense.path or dense.name} is quantized to {mode!r}; the "
            "Reformer's attention and feed-forward projections support "
            "quantize('int8') only.")
    # Keras keeps the int8 kernel in `_kernel` and a per-output-channel
    # `kernel_scale` laid out for the einsum's output; it divides by the
    # scale after the einsum, which for a float kernel is the same as
    # dividing the kernel by the scale in the kernel's own layout.
    scale = dense._adjust_scale_for_dequant(dense.kernel_scale)
    kernel = ops.cast(dense._kernel, "float32") / ops.cast(scale, "float32")
    if dense.lora_enabled:
        kernel = kernel + (dense.lora_alpha / dense.lora_rank) * ops.matmul(
            ops.cast(dense.lora_kernel_a, "float32"),
            ops.cast(dense.lora_kernel_b, "float32"))
    return ops.cast(kernel, dtype)
