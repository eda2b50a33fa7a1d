"""Local and Linformer attention against full attention."""

import numpy as np
import pytest
from keras import ops

from keras_reformer.layers import FullSelfAttention
from keras_reformer.layers import LinformerSelfAttention
from keras_reformer.layers import LocalSelfAttention
from keras_reformer.layers import local_self_attention
from tests.helpers import assert_close
from tests.helpers import assert_recomputed_gradient_equals_autodiff
from tests.helpers import assert_same_as_whole
from tests.helpers import projection_kernels
from tests.helpers import segmented_and_whole
from tests.helpers import unrolled_runs
from tests.helpers import to_numpy
from tests.helpers import value_and_grads

BATCH, LENGTH, HIDDEN = 2, 37, 24


def inputs(seed=0):
    return np.random.RandomState(seed).randn(BATCH, LENGTH, HIDDEN).astype(
        "float32")


def padding_mask():
    mask = np.ones((BATCH, LENGTH), "int32")
    mask[0, :5] = 0
    mask[1, LENGTH - 7:] = 0
    return mask


def full_with_weights_of(layer, causal):
    full = FullSelfAttention(2, 8, causal=causal)
    full.build((BATCH, LENGTH, HIDDEN))
    full.set_weights(projection_kernels(layer))
    return full


@pytest.mark.parametrize("causal", [False, True])
def test_local_with_one_chunk_equals_full_attention(causal):
    local = LocalSelfAttention(2, 8, chunk_length=64, causal=causal)
    local.build((BATCH, LENGTH, HIDDEN))
    full = full_with_weights_of(local, causal)
    x, mask = inputs(), padding_mask()
    valid = mask[..., None]
    assert_close(to_numpy(local(x, padding_mask=mask)) * valid,
                 to_numpy(full(x, padding_mask=mask)) * valid, atol=2e-5)


def banded_full_attention(layer, x, chunk, before, after, causal):
    """Full attention restricted to the chunk band, in numpy."""
    wq, wk, wv, wo = [to_numpy(w) for w in layer.get_weights()]
    q = np.einsum("blh,hnd->bnld", x, wq)
    k = np.einsum("blh,hnd->bnld", x, wk) / np.sqrt(wq.shape[-1])
    v = np.einsum("blh,hnd->bnld", x, wv)
    scores = np.einsum("bnqd,bnkd->bnqk", q, k)
    positions = np.arange(x.shape[1])
    offset = positions[None] // chunk - positions[:, None] // chunk
    allowed = (offset >= -before) & (offset <= after)
    if causal:
        allowed &= positions[:, None] >= positions[None]
    scores = np.where(allowed, scores, -1e9)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnld,ndh->blh",
                     np.einsum("bnqk,bnkd->bnqd", weights, v), wo)


# The last two: fewer chunks (3) than the window, where rolled neighbours
# wrap around and repeat; each key must still count once.
@pytest.mark.parametrize("causal,before,after,chunk", [
    (True, 1, 0, 8), (False, 1, 1, 8), (False, 2, 0, 8), (True, 0, 0, 8),
    (True, 3, 0, 16), (False, 2, 2, 16)])
def test_local_attention_equals_banded_attention(causal, before, after,
                                                 chunk):
    local = LocalSelfAttention(2, 8, chunk_length=chunk, causal=causal,
                               num_chunks_before=before,
                               num_chunks_after=after)
    local.build((BATCH, LENGTH, HIDDEN))
    x = inputs()
    assert_close(local(x), banded_full_attention(
        local, x, chunk, before, after, causal), atol=2e-5)


def test_local_causal_never_reads_the_future_and_ignores_padding():
    local = LocalSelfAttention(2, 8, chunk_length=8, causal=True)
    local.build((BATCH, LENGTH, HIDDEN))
    x, mask = inputs(), padding_mask()
    changed = x.copy()
    changed[:, 20:] = inputs(seed=3)[:, 20:]
    assert_close(to_numpy(local(x))[:, :20], to_numpy(local(changed))[:, :20],
                 atol=1e-6)
    noisy = np.where(mask[..., None] == 1, x, 50 * inputs(seed=4))
    valid = mask[..., None]
    assert_close(to_numpy(local(x, padding_mask=mask)) * valid,
                 to_numpy(local(noisy, padding_mask=mask)) * valid, atol=1e-5)


def _segmented_and_whole(segments, causal=True, after=0, dropout=0.0):
    """Local layers attending in `segments` runs of chunks and all at once,
    sharing weights (29 tokens, chunks of 4: 8 chunks)."""
    return segmented_and_whole(
        LocalSelfAttention, segments, num_heads=2, head_dim=8,
        chunk_length=4, causal=causal, num_chunks_after=after,
        dropout=dropout, seed=1)


@pytest.mark.parametrize("segments,causal,after",
                         [(2, True, 0), (8, False, 1), (4, False, 0)])
def test_local_segments_equal_all_chunks_at_once(segments, causal, after):
    assert_same_as_whole(*_segmented_and_whole(segments, causal, after))


def test_local_segments_recomputed_gradient_equals_autodiff_with_dropout(
        monkeypatch):
    segmented, _ = _segmented_and_whole(4, causal=False, after=1,
                                        dropout=0.3)
    assert_recomputed_gradient_equals_autodiff(
        segmented, lambda: monkeypatch.setattr(
            local_self_attention, "attention_in_runs", unrolled_runs))


def test_local_segments_that_do_not_divide_the_chunks_use_a_divisor():
    with pytest.raises(ValueError, match="segments=0"):
        LocalSelfAttention(2, 8, segments=0)
    # 8 chunks in 3 segments: 2 runs of 4 chunks.
    assert_same_as_whole(*_segmented_and_whole(3))


@pytest.mark.parametrize("sharing", ["none", "headwise", "key_value"])
def test_linformer_with_identity_projections_equals_full_attention(sharing):
    layer = LinformerSelfAttention(2, 8, max_length=LENGTH,
                                   projected_length=LENGTH, sharing=sharing)
    layer.build((BATCH, LENGTH, HIDDEN))
    identity = np.eye(LENGTH, dtype="float32")
    for projection in layer.weights[4:]:
        projection.assign(np.broadcast_to(identity, projection.shape))
    full = full_with_weights_of(layer, causal=False)
    x = inputs()
    assert_close(layer(x), full(x), atol=2e-5)
    expected_projections = {"none": 2, "headwise": 2, "key_value": 1}[sharing]
    assert len(layer.weights) == 4 + expected_projections


def test_linformer_shorter_inputs_and_padding():
    layer = LinformerSelfAttention(2, 8, max_length=64, projected_length=16)
    x, mask = inputs(), padding_mask()
    out = to_numpy(layer(x, padding_mask=mask))
    assert out.shape == (BATCH, LENGTH, HIDDEN)
    noisy = np.where(mask[..., None] == 1, x, 50 * inputs(seed=4))
    valid = mask[..., None]
    assert_close(out * valid,
                 to_numpy(layer(noisy, padding_mask=mask)) * valid, atol=1e-5)
    with pytest.raises(ValueError, match="max_length=64"):
        layer(np.zeros((1, 65, HIDDEN), "float32"))


def test_linformer_rejects_causal_and_bad_sharing():
    with pytest.raises(ValueError, match="causal"):
        LinformerSelfAttention(2, 8, max_length=8, projected_length=4,
                               causal=True)
    with pytest.raises(ValueError, match="sharing"):
        LinformerSelfAttention(2, 8, max_length=8, projected_length=4,
                               sharing="everything")


@pytest.mark.parametrize("make", [
    lambda: LocalSelfAttention(2, 8, chunk_length=8, causal=True, dropout=0.1,
                               seed=1, segments=5),
    lambda: LinformerSelfAttention(2, 8, max_length=LENGTH,
                                   projected_length=16, sharing="headwise",
                                   dropout=0.1, seed=1),
])
def test_config_round_trip_and_finite_gradients(make):
    layer = make()
    x, mask = inputs(), padding_mask()
    layer.build(x.shape)
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    assert_close(clone(x, padding_mask=mask), layer(x, padding_mask=mask),
                 atol=0)
    value, x_grad, grads = value_and_grads(
        lambda x: ops.sum(layer(x, padding_mask=mask, training=True) ** 2),
        x, layer.trainable_variables)
    assert np.isfinite(value)
    for grad in [x_grad] + grads:
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
