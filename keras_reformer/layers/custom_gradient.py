"""Custom gradients with explicit inputs, one implementation per backend.

The reversible stack and `recomputed_loop` both replace autodiff's
stored activations with recomputation. They describe their gradient once, as
a `forward` and a `backward` written with `keras.ops`; this module registers
that pair with the backend: `tf.custom_gradient` on TensorFlow and
`jax.custom_vjp` on JAX. Every tensor the computation depends on, weights
included, is an explicit argument, so neither backend sees a closed-over
variable.
"""

import keras


def _backend():
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        raise NotImplementedError(
            f"keras_reformer supports the 'tensorflow' and 'jax' backends; "
            f"the active Keras backend is '{backend}'."
        )
    return backend


def with_custom_gradient(forward, backward):
    """Builds a function whose gradient is computed by `backward`.

    Args:
        forward: `forward(*args) -> (outputs, residuals)`, `outputs` a tuple
            of tensors, `residuals` whatever `backward` needs (a tuple of
            tensors).
        backward: `backward(residuals, output_grads) -> grads`, a tuple with
            one gradient per argument of `forward` (`None` for arguments that
            take no gradient, such as integer seeds or boolean masks).

    Returns:
        A function of the same arguments as `forward` returning `outputs`.

    Example:
    >>> square = with_custom_gradient(
    ...     lambda x: ((x * x,), (x,)), lambda res, g: (2 * res[0] * g[0],))
    """
    if _backend() == "tensorflow":
        import tensorflow as tf

        @tf.custom_gradient
        def function(*args):
            outputs, residuals = forward(*args)

            def grad_fn(*output_grads):
                return list(backward(residuals, output_grads))

            return outputs, grad_fn

        return function

    import jax

    @jax.custom_vjp
    def function(*args):
        return forward(*args)[0]

    def function_bwd(residuals, output_grads):
        return tuple(backward(residuals, tuple(output_grads)))

    function.defvjp(forward, function_bwd)
    return function


def vjp(fn, primals):
    """Evaluates `fn(*primals)` and returns its pullback.

    Args:
        fn: a function of tensors returning a tuple of tensors.
        primals: list of input tensors (all differentiable).

    Returns:
        `(outputs, pullback)`: `fn`'s outputs, and a function that takes
        cotangents shaped like them (computed from the outputs, if need be)
        and returns one gradient per primal (zeros where an input does not
        influence the outputs). Call it once.
    """
    if _backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(primals)
            outputs = fn(*primals)

        def pullback(cotangents):
            return tape.gradient(
                list(outputs),
                primals,
                output_gradients=list(cotangents),
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )

        return outputs, pullback

    import jax

    outputs, jax_pullback = jax.vjp(fn, *primals)
    return outputs, lambda cotangents: list(jax_pullback(tuple(cotangents)))


def value_and_vjp(fn, primals, cotangents):
    """`fn(*primals)` and `cotangents` pulled back to the primals (see
    `vjp`): `(outputs, grads)`."""
    outputs, pullback = vjp(fn, primals)
    return outputs, pullback(cotangents)


def tensor_values(variables):
    """The current values of Keras variables as plain tensors.

    `ops.copy` yields a tensor on every backend (in TensorFlow eager mode a
    variable's `.value` is still a `tf.Variable`, which custom gradients
    reject), and gradients flow through it back to the variable.
    """
    return [keras.ops.copy(v.value) for v in variables]


def after(x, tensors):
    """`tensors` plus a zero computed from `x`: a sequencing hint for XLA.

    Work on the returned tensors cannot start before `x` exists. XLA would
    otherwise run work that depends on weights alone (broadcasting a norm's
    scale, say) or on forward values alone (recomputation in a backward
    pass) as early as it can, or merge it with the identical forward
    computation, and keep the results alive until they are used.

    Args:
        x: a tensor.
        tensors: list of tensors; non-float ones are returned unchanged.

    Returns:
        A list of tensors equal to `tensors`.
    """
    zero = keras.ops.cast(keras.ops.sum(x[(slice(0, 1),) * len(x.shape)]),
                          "float32") * 0.0
    return [t + keras.ops.cast(zero, t.dtype)
            if keras.backend.is_float_dtype(t.dtype) else t for t in tensors]
