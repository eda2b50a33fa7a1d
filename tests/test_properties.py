"""Property tests over random shapes, chunk lengths, hash rounds and masks."""

import numpy as np
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_reformer.layers import FullSelfAttention
from keras_reformer.layers import LocalSelfAttention
from keras_reformer.layers import LSHSelfAttention
from tests.helpers import projection_kernels
from tests.helpers import to_numpy
from tests.helpers import value_and_grads

HIDDEN = 8
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configurations(draw):
    """Layer settings and data shapes (the layer is built outside the
    strategy: Keras initialisers draw from Python's random module)."""
    causal = draw(st.booleans())
    return {
        "batch": draw(st.integers(1, 3)),
        "length": draw(st.integers(1, 40)),
        "chunk": draw(st.sampled_from([1, 2, 4, 8, 16])),
        "kind": draw(st.sampled_from(["lsh", "local"])),
        "causal": causal,
        "num_hashes": draw(st.integers(1, 4)),
        "num_buckets": draw(st.sampled_from([2, 4, (2, 4)])),
        "padding": draw(st.sampled_from([0.0, 0.3])),
        "seed": draw(st.integers(0, 2**16)),
    }


def layer_and_data(c):
    rng = np.random.RandomState(c["seed"])
    x = rng.randn(c["batch"], c["length"], HIDDEN).astype("float32")
    mask = (rng.rand(c["batch"], c["length"]) > c["padding"]).astype("int32")
    after = 0 if c["causal"] else 1
    if c["kind"] == "lsh":
        layer = LSHSelfAttention(
            2, 4, chunk_length=c["chunk"], num_hashes=c["num_hashes"],
            num_buckets=c["num_buckets"], causal=c["causal"],
            num_chunks_after=after, seed=c["seed"])
    else:
        layer = LocalSelfAttention(2, 4, chunk_length=c["chunk"],
                                   causal=c["causal"], num_chunks_after=after)
    layer.build(x.shape)
    return layer, x, mask, rng


@SETTINGS
@given(configurations())
def test_outputs_finite_and_padding_changes_nothing(configuration):
    layer, x, mask, rng = layer_and_data(configuration)
    out = to_numpy(layer(x, padding_mask=mask))
    assert out.shape == x.shape and np.all(np.isfinite(out))
    noisy = np.where(mask[..., None] == 1, x,
                     10 * rng.randn(*x.shape).astype("float32"))
    again = to_numpy(layer(noisy, padding_mask=mask))
    valid = mask[..., None]
    np.testing.assert_allclose(out * valid, again * valid, atol=1e-5)


@SETTINGS
@given(configurations())
def test_results_do_not_depend_on_how_the_batch_is_split(configuration):
    layer, x, mask, _ = layer_and_data(configuration)
    whole = to_numpy(layer(x, padding_mask=mask))
    for i in range(x.shape[0]):
        alone = to_numpy(layer(x[i:i + 1], padding_mask=mask[i:i + 1]))
        np.testing.assert_allclose(alone[0], whole[i], atol=1e-5)


@SETTINGS
@given(configurations(), st.data())
def test_causal_outputs_never_depend_on_later_tokens(configuration, data):
    configuration["causal"] = True
    layer, x, mask, _ = layer_and_data(configuration)
    t = data.draw(st.integers(0, x.shape[1] - 1))

    def loss(x):
        out = layer(x, padding_mask=mask, training=True)
        return ops.sum(out[:, : t + 1] ** 2)

    value, x_grad, _ = value_and_grads(loss, x, [])
    assert np.isfinite(value)
    assert np.abs(x_grad[:, t + 1:]).max(initial=0.0) == 0.0


@st.composite
def whole_window_configurations(draw):
    """Layers whose chunk windows reach every chunk (possibly several times
    round the ring), so that they compute exact attention, and padding
    that holds NaN or inf."""
    kind = draw(st.sampled_from(["lsh", "local"]))
    causal = draw(st.booleans())
    length = draw(st.integers(1, 24))
    chunk = draw(st.sampled_from([1, 2, 4, 8]))
    chunks = -(-length // chunk)
    before = draw(st.integers(chunks - 1, chunks + 2))
    # LSH windows wrap round the ring of chunks; local ones do not.
    least_after = chunks - 1 if kind == "local" else 0
    after = 0 if causal else draw(st.integers(least_after, least_after + 2))
    return {
        "kind": kind,
        "causal": causal,
        "length": length,
        "chunk": chunk,
        "before": before,
        "after": after,
        "parallel_heads": draw(st.sampled_from([None, 1])),
        "segments": draw(st.sampled_from([None, 2])),
        "poison": draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30])),
        "seed": draw(st.integers(0, 2**16)),
    }


@SETTINGS
@given(whole_window_configurations())
def test_padding_holding_nan_or_inf_and_wrapping_windows_give_exact_attention(
        c):
    rng = np.random.RandomState(c["seed"])
    x = rng.randn(2, c["length"], HIDDEN).astype("float32")
    mask = (rng.rand(2, c["length"]) > 0.3).astype("int32")
    mask[:, 0] = 1  # every sequence has a real token
    poisoned = np.where(mask[..., None] == 1, x, np.float32(c["poison"]))
    windows = dict(chunk_length=c["chunk"], causal=c["causal"],
                   num_chunks_before=c["before"],
                   num_chunks_after=c["after"], segments=c["segments"])
    if c["kind"] == "lsh":
        layer = LSHSelfAttention(
            2, 4, num_hashes=1, num_buckets=2, seed=c["seed"],
            parallel_heads=c["parallel_heads"], **windows)
    else:
        layer = LocalSelfAttention(2, 4, **windows)
    exact = FullSelfAttention(2, 4, causal=c["causal"],
                              shared_qk=c["kind"] == "lsh")
    layer.build(x.shape)
    exact.build(x.shape)
    exact.set_weights(projection_kernels(layer))
    expected = to_numpy(exact(x, padding_mask=mask)) * mask[..., None]

    def loss(inputs):
        return ops.sum(layer(inputs, padding_mask=mask) ** 2)

    out = to_numpy(layer(poisoned, padding_mask=mask))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    value, x_grad, kernel_grads = value_and_grads(loss, poisoned,
                                                  layer.trainable_weights)
    assert np.isfinite(value) and np.all(np.isfinite(x_grad))
    assert all(np.all(np.isfinite(g)) for g in kernel_grads)
    assert np.all(x_grad[mask == 0] == 0)
