"""Backend-agnostic helpers for the tests."""

import keras
import numpy as np

from keras_reformer.layers.chunked_attention import dividing_runs
from keras_reformer.layers.recomputed_loop import step_views
from keras_reformer.layers.seeds import seed_tensor


def value_and_grads(loss_fn, inputs, variables):
    """`loss_fn(inputs)` and its gradients wrt `inputs` and `variables`.

    Runs under `tf.GradientTape` on TensorFlow and a jitted
    `jax.value_and_grad` (with the variables mapped through a
    `keras.StatelessScope`) on JAX: one compilation instead of JAX's eager
    dispatch of every operation, which is many times slower on the CPU.

    Returns:
        `(loss, input_grad, [variable grads])` as numpy arrays.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        inputs = tf.convert_to_tensor(inputs)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = loss_fn(inputs)
        grads = tape.gradient(loss, [inputs] + list(variables))
        return to_numpy(loss), to_numpy(grads[0]), to_numpy(grads[1:])

    import jax

    def function(values, x):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return loss_fn(x)

    values = [v.value for v in variables]
    loss, (variable_grads, input_grad) = jax.jit(jax.value_and_grad(
        function, argnums=(0, 1)))(values, inputs)
    return to_numpy(loss), to_numpy(input_grad), to_numpy(variable_grads)


def to_numpy(x):
    if isinstance(x, (list, tuple)):
        return [to_numpy(v) for v in x]
    return np.asarray(keras.ops.convert_to_numpy(x))


def projection_kernels(layer):
    """The kernels of an attention layer's projections (`projections`),
    as numpy arrays."""
    return [to_numpy(dense.kernel) for dense in layer.projections]


def assert_close(actual, expected, atol, rtol=0.0):
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected),
                               atol=atol, rtol=rtol)


# Source for scripts run in subprocesses (after importing keras, numpy as
# np, ReformerBackbone): a tiny LSH + local backbone and one batch of
# next-token training data, `x` and `y`.
TINY_LM_SOURCE = """
def tiny_backbone():
    keras.utils.set_random_seed(1)
    return ReformerBackbone(
        50, hidden_dim=32, num_heads=2, head_dim=8, intermediate_dim=48,
        attention_types=["lsh", "local"], axial_shape=(8, 8), seed=1,
        attention_options={"lsh": {"chunk_length": 16, "num_hashes": 2},
                           "local": {"chunk_length": 16}})

ids = np.random.RandomState(0).randint(1, 50, (8, 65)).astype("int32")
x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((8, 64), "int32")}
y = ids[:, 1:]
"""


def unrolled_runs(attend_run, inputs, layout, runs, chunk_length, seed=None,
                  slicing=None, result_axes=(2, 2)):
    """`chunked_attention.attention_in_runs` written as a plain loop: the
    same runs, slices and seeds under autodiff, no recomputation."""
    slots = keras.ops.shape(layout[0])[2]
    runs = dividing_runs(runs, slots // chunk_length)
    run = slots // runs
    results = [attend_run(s, run, step_views(inputs, s, run, slicing),
                          layout, seed) for s in range(runs)]
    return tuple(keras.ops.concatenate(parts, axis=axis)
                 for parts, axis in zip(zip(*results), result_axes))


def assert_same_value_and_grads(actual, expected):
    """Equal `value_and_grads` results, with a non-zero input gradient."""
    assert_close(actual[0], expected[0], atol=1e-4)
    assert np.abs(actual[1]).max() > 0
    assert_close(actual[1], expected[1], atol=1e-5)
    for a, b in zip(actual[2], expected[2]):
        assert_close(a, b, atol=1e-5)


def padded_inputs():
    """Inputs `(2, 29, 24)` and a padding mask hiding 9 of the first
    row's tokens."""
    x = np.random.RandomState(2).randn(2, 29, 24).astype("float32")
    mask = np.ones((2, 29), "int32")
    mask[0, :9] = 0
    return x, mask


def assert_recomputed_gradient_equals_autodiff(layer, unroll):
    """`layer`'s value and gradients (padded inputs, dropout seeded) equal
    those after `unroll()` replaces its recomputing loop with the same
    computation unrolled under plain autodiff."""
    x, mask = padded_inputs()

    def loss(x):
        return keras.ops.sum(layer(x, padding_mask=mask, training=True,
                                   seed=seed_tensor(3)) ** 2)

    actual = value_and_grads(loss, x, layer.trainable_variables)
    unroll()
    expected = value_and_grads(loss, x, layer.trainable_variables)
    assert_same_value_and_grads(actual, expected)


def assert_same_as_whole(segmented, whole):
    """Layers computing one function in pieces and at once (sharing
    weights) agree: value and gradients of a loss on padded inputs."""
    x, mask = padded_inputs()

    def loss(layer):
        return lambda x: keras.ops.sum(layer(
            x, padding_mask=mask, training=True, seed=seed_tensor(3)) ** 2)

    assert_same_value_and_grads(
        value_and_grads(loss(segmented), x, segmented.trainable_variables),
        value_and_grads(loss(whole), x, whole.trainable_variables))


def segmented_and_whole(layer_class, segments, **kwargs):
    """Two `layer_class(**kwargs)` layers sharing weights, the first with
    `segments`, built for `padded_inputs()`."""
    segmented = layer_class(segments=segments, **kwargs)
    whole = layer_class(**kwargs)
    for layer in (segmented, whole):
        layer.build((2, 29, 24))
    whole.set_weights(segmented.get_weights())
    return segmented, whole
