"""Property tests over random shapes, chunk lengths, hash rounds and masks."""

import numpy as np
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_reformer.layers import LocalSelfAttention
from keras_reformer.layers import LSHSelfAttention
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
