"""LSHSelfAttention against full shared-QK attention and its masking rules."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_reformer.layers import FullSelfAttention
from keras_reformer.layers import LSHSelfAttention
from keras_reformer.layers import hashing
from keras_reformer.layers.chunked_attention import mask_values
from keras_reformer.layers.seeds import seed_tensor
from tests.helpers import assert_close
from tests.helpers import projection_kernels
from tests.helpers import to_numpy
from tests.helpers import value_and_grads

BATCH, LENGTH, HIDDEN = 2, 37, 24


def inputs(seed=0, length=LENGTH):
    return np.random.RandomState(seed).randn(BATCH, length, HIDDEN).astype(
        "float32")


def padding_mask(length=LENGTH):
    """Left padding in the first sequence, right padding in the second."""
    mask = np.ones((BATCH, length), "int32")
    mask[0, :5] = 0
    mask[1, length - 7:] = 0
    return mask


def lsh_and_full(causal, num_hashes=3, num_buckets=4, **kwargs):
    """An LSH layer whose one chunk spans the sequence, and full attention
    with the same weights."""
    lsh = LSHSelfAttention(2, 8, chunk_length=64, num_hashes=num_hashes,
                           num_buckets=num_buckets, causal=causal, seed=1,
                           **kwargs)
    full = FullSelfAttention(2, 8, causal=causal, shared_qk=True)
    lsh.build((BATCH, LENGTH, HIDDEN))
    full.build((BATCH, LENGTH, HIDDEN))
    full.set_weights(projection_kernels(lsh))
    return lsh, full

def numpy_shared_qk_attention(x, qk_kernel, v_kernel, out_kernel, mask,
                              causal):
    """Shared-QK attention written directly in numpy (float64)."""
    x = x.astype("float64")
    qk = np.einsum("blh,hnd->bnld", x, qk_kernel)
    v = np.einsum("blh,hnd->bnld", x, v_kernel)
    keys = qk / np.linalg.norm(qk, axis=-1, keepdims=True)
    scores = np.einsum("bnqd,bnkd->bnqk", qk, keys)
    length = x.shape[1]
    allowed = np.broadcast_to(mask[:, None, None, :].astype(bool),
                              scores.shape).copy()
    if causal:
        allowed &= np.tril(np.ones((length, length), bool))
    scores = np.where(allowed, scores, -1e9)
    scores = np.where(np.eye(length, dtype=bool), -1e5, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bnqk,bnkd->bnqd", weights, v)
    return np.einsum("bnld,ndh->blh", out, out_kernel)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_equals_full_shared_qk_attention_when_one_chunk_spans(causal,
                                                              training):
    lsh, full = lsh_and_full(causal)
    x, mask = inputs(), padding_mask()
    valid = mask[..., None]
    actual = lsh(x, padding_mask=mask, training=training, seed=seed_tensor(2))
    expected = full(x, padding_mask=mask)
    assert_close(to_numpy(actual) * valid, to_numpy(expected) * valid,
                 atol=2e-5)
    reference = numpy_shared_qk_attention(
        x, *projection_kernels(lsh), mask, causal)
    assert_close(to_numpy(expected) * valid, reference * valid, atol=2e-5)


def test_factorised_buckets_equal_full_attention():
    lsh, full = lsh_and_full(causal=True, num_buckets=(4, 8))
    x, mask = inputs(), padding_mask()
    valid = mask[..., None]
    assert lsh.rotations.shape == (2, 8, 3, 6)
    assert_close(to_numpy(lsh(x, padding_mask=mask)) * valid,
                 to_numpy(full(x, padding_mask=mask)) * valid, atol=2e-5)


@pytest.mark.parametrize("causal, before, after", [
    (False, 1, 1),  # look-back and look-ahead reach the same chunk
    (True, 2, 0),   # the look-back goes round the ring to the query's own
])
def test_a_window_reaching_a_chunk_twice_counts_its_keys_once(causal, before,
                                                              after):
    """Two chunks, one hash round: every chunk's window holds every key,
    some chunks twice; each key must count once, as in exact attention."""
    lsh = LSHSelfAttention(2, 8, chunk_length=16, num_hashes=1, num_buckets=2,
                           causal=causal, num_chunks_before=before,
                           num_chunks_after=after, seed=1)
    x = inputs(length=32)
    mask = np.ones((BATCH, 32), "int32")
    lsh.build(x.shape)
    reference = numpy_shared_qk_attention(
        x, *projection_kernels(lsh), mask, causal)
    assert_close(lsh(x), reference, atol=2e-5)


def many_chunk_layer(causal=True, **kwargs):
    layer = LSHSelfAttention(2, 8, chunk_length=4, num_hashes=2,
                             num_buckets=8, causal=causal, seed=3, **kwargs)
    layer.build((BATCH, LENGTH, HIDDEN))
    return layer


def test_causal_outputs_have_no_gradient_from_future_tokens():
    layer = many_chunk_layer()
    x = inputs()
    t = 20
    for training in (False, True):
        def loss(x):
            out = layer(x, training=training, seed=seed_tensor(4))
            return ops.sum(out[:, : t + 1] ** 2)

        _, x_grad, _ = value_and_grads(loss, x, [])
        assert np.abs(x_grad[:, t + 1:]).max() == 0.0
        assert np.abs(x_grad[:, : t + 1]).max() > 0.0


def test_causal_changing_future_tokens_leaves_earlier_outputs():
    # With one chunk per round nothing else can move; the outputs up to t
    # must not change when every later token changes.
    lsh, _ = lsh_and_full(causal=True)
    x = inputs()
    changed = x.copy()
    t = 17
    changed[:, t + 1:] = inputs(seed=9)[:, t + 1:]
    for training in (False, True):
        a = lsh(x, training=training, seed=seed_tensor(5))
        b = lsh(changed, training=training, seed=seed_tensor(5))
        assert_close(to_numpy(a)[:, : t + 1], to_numpy(b)[:, : t + 1],
                     atol=1e-6)
        assert np.abs(to_numpy(a)[:, t + 1:] - to_numpy(b)[:, t + 1:]).max(
        ) > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_padded_tokens_change_nothing(causal):
    layer = many_chunk_layer(causal=causal, num_chunks_after=0 if causal else 1)
    x, mask = inputs(), padding_mask()
    noisy = np.where(mask[..., None] == 1, x, 100 * inputs(seed=7))
    for training in (False, True):
        a = to_numpy(layer(x, padding_mask=mask, training=training,
                           seed=seed_tensor(6)))
        b = to_numpy(layer(noisy, padding_mask=mask, training=training,
                           seed=seed_tensor(6)))
        valid = mask[..., None]
        assert_close(a * valid, b * valid, atol=1e-5)
        assert np.all(np.isfinite(a))


@pytest.mark.parametrize("causal,before,after,num_hashes", [
    (True, 1, 0, 3), (True, 2, 0, 1), (False, 1, 1, 2), (False, 0, 2, 3)])
def test_outputs_do_not_depend_on_the_amount_of_padding(causal, before, after,
                                                        num_hashes):
    # 21 real tokens in chunks of 4: the padded rows hold whole chunks of
    # padding, which must not enter the ring of chunks (nor change the
    # real tokens' neighbours) in any round.
    layer = LSHSelfAttention(2, 8, chunk_length=4, num_hashes=num_hashes,
                             num_buckets=4, causal=causal,
                             num_chunks_before=before, num_chunks_after=after,
                             seed=3)
    real = np.random.RandomState(4).randn(1, 21, HIDDEN).astype("float32")
    alone = to_numpy(layer(real))[0]
    for left, right in [(0, 19), (13, 0), (9, 30)]:
        x = np.zeros((1, left + 21 + right, HIDDEN), "float32")
        x[:, left:left + 21] = real
        mask = np.zeros(x.shape[:2], "int32")
        mask[:, left:left + 21] = 1
        padded = to_numpy(layer(x, padding_mask=mask))[0]
        assert_close(padded[left:left + 21], alone, atol=1e-5)


def test_gradients_finite_with_left_padding_and_causal_mask():
    layer = many_chunk_layer(dropout=0.1)
    x, mask = inputs(), padding_mask()

    def loss(x):
        return ops.sum(layer(x, padding_mask=mask, training=True,
                             seed=seed_tensor(8)))

    value, x_grad, weight_grads = value_and_grads(
        loss, x, layer.trainable_variables)
    assert np.isfinite(value)
    for grad in [x_grad] + weight_grads:
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_hashing_is_repeatable_per_seed_and_fixed_at_inference():
    layer = many_chunk_layer()
    x = inputs()
    first = to_numpy(layer(x, training=True, seed=seed_tensor(1)))
    again = to_numpy(layer(x, training=True, seed=seed_tensor(1)))
    other = to_numpy(layer(x, training=True, seed=seed_tensor(2)))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-4
    np.testing.assert_array_equal(to_numpy(layer(x)), to_numpy(layer(x)))
    # Without an explicit seed, training draws fresh rotations each call.
    assert np.abs(to_numpy(layer(x, training=True))
                  - to_numpy(layer(x, training=True))).max() > 1e-4


def test_buckets_follow_argmax_of_rotations():
    rng = np.random.RandomState(0)
    vectors = rng.randn(1, 2, 10, 8).astype("float32")
    rotations = rng.randn(2, 8, 3, 2 + 4).astype("float32")
    buckets = to_numpy(hashing.hash_vectors(vectors, rotations, (4, 8)))
    rotated = np.einsum("bhld,hdnr->bhnlr", vectors, rotations)
    low = np.argmax(np.concatenate([rotated[..., :2], -rotated[..., :2]], -1),
                    -1)
    high = np.argmax(np.concatenate([rotated[..., 2:], -rotated[..., 2:]],
                                    -1), -1)
    np.testing.assert_array_equal(buckets, low + 4 * high)


@pytest.mark.parametrize("length,chunk,expected", [
    (64, 64, 2), (4096, 64, 128), (4096 + 64, 64, 128), (65536, 64, (32, 64)),
    (256, 32, 16)])
def test_auto_num_buckets(length, chunk, expected):
    assert hashing.auto_num_buckets(length, chunk) == expected


def test_auto_num_buckets_from_static_length_at_build():
    layer = LSHSelfAttention(2, 8, chunk_length=16)
    layer.build((1, 250, HIDDEN))
    assert layer.resolved_num_buckets == 32
    with pytest.raises(ValueError, match="num_buckets=None"):
        LSHSelfAttention(2, 8).build((1, None, HIDDEN))


@pytest.mark.parametrize("kwargs,message", [
    ({"num_buckets": 5}, "num_buckets"),
    ({"num_buckets": (4, 3)}, "num_buckets"),
    ({"chunk_length": 0}, "chunk_length"),
    ({"num_hashes": 0}, "num_hashes"),
    ({"causal": True, "num_chunks_after": 1}, "num_chunks_after"),
    ({"dropout": 1.0}, "dropout"),
    ({"parallel_heads": 0}, "parallel_heads=0"),
    ({"parallel_heads": 3}, "parallel_heads=3 with num_heads=2"),
])
def test_bad_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LSHSelfAttention(2, 8, **kwargs)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_masks_are_finite_and_close(dtype):
    mask_value, self_value = mask_values(dtype)
    assert np.isfinite(np.array(mask_value, dtype="float32").astype(
        "float16" if dtype == "float16" else "float32"))
    # One chunk per round: half-precision projections may move a token to
    # another bucket, which with many chunks changes what it attends to.
    layer, _ = lsh_and_full(causal=True)
    half, _ = lsh_and_full(causal=True, dtype=dtype)
    half.set_weights(layer.get_weights())
    x, mask = inputs(), padding_mask()
    expected = to_numpy(layer(x, padding_mask=mask))
    actual = to_numpy(ops.cast(half(ops.cast(x, dtype), padding_mask=mask),
                               "float32"))
    valid = mask[..., None]
    assert np.all(np.isfinite(actual))
    # Measured over 10 seeds: at most 1.2e-3 (float16), 6.7e-3 (bfloat16).
    tolerance = {"float16": 1e-2, "bfloat16": 5e-2}[dtype]
    assert np.abs((actual - expected) * valid).max() < tolerance


def test_config_round_trip():
    layer = LSHSelfAttention(2, 8, chunk_length=16, num_hashes=2,
                             num_buckets=(4, 8), causal=True, dropout=0.1,
                             seed=3, parallel_heads=1, segments=2)
    clone = LSHSelfAttention.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    x = inputs()
    layer.build(x.shape)
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    assert_close(clone(x), layer(x), atol=0)


@pytest.mark.parametrize("layer_kwargs", [{}, {"causal": True}])
def test_bad_inputs_raise_clear_errors(layer_kwargs):
    layer = LSHSelfAttention(2, 8, chunk_length=8, num_buckets=4,
                             **layer_kwargs)
    layer(inputs())
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        layer(inputs(), padding_mask=np.ones((BATCH, LENGTH + 1), "int32"))
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        layer(inputs(), padding_mask=np.ones((BATCH,), "int32"))
    with pytest.raises(ValueError, match="expected axis -1"):
        layer(np.zeros((BATCH, LENGTH, HIDDEN + 1), "float32"))
    with pytest.raises(ValueError, match="expected ndim=3"):
        layer(np.zeros((LENGTH, HIDDEN), "float32"))
    with pytest.raises(ValueError, match=r"\(batch, length, hidden\)"):
        LSHSelfAttention(2, 8, num_buckets=4).build((LENGTH, HIDDEN))
