"""Row gathers whose gradient gathers too, against plain autodiff."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_reformer.layers import LSHSelfAttention
from keras_reformer.layers import FullSelfAttention
from keras_reformer.layers import lsh_self_attention
from keras_reformer.layers.chunked_attention import dividing_runs
from keras_reformer.layers.permute import gather_rows
from keras_reformer.layers.permute import inverse_permutation
from keras_reformer.layers.permute import order_by_key
from keras_reformer.layers.permute import take_rows
from keras_reformer.layers.recomputed_loop import step_views
from keras_reformer.layers.seeds import seed_tensor
from tests.helpers import assert_close
from tests.helpers import assert_recomputed_gradient_equals_autodiff
from tests.helpers import assert_same_as_whole
from tests.helpers import assert_same_value_and_grads
from tests.helpers import padded_inputs
from tests.helpers import projection_kernels
from tests.helpers import segmented_and_whole
from tests.helpers import unrolled_runs
from tests.helpers import value_and_grads


def test_gradient_equals_autodiff_of_take_along_axis():
    rng = np.random.RandomState(0)
    copies, rows = 3, 7
    index = np.stack([np.stack([np.concatenate(
        [rng.permutation(rows) for _ in range(copies)]) for _ in range(2)])
        for _ in range(2)]).astype("int32")  # (2, 2, copies * rows)
    # inverse[c * rows + r]: where index picks row r for the c-th time.
    inverse = np.zeros_like(index)
    for b in range(2):
        for h in range(2):
            seen = np.zeros(rows, int)
            for j, r in enumerate(index[b, h]):
                inverse[b, h, seen[r] * rows + r] = j
                seen[r] += 1
    x = rng.randn(2, 2, rows, 5).astype("float32")
    weights = rng.randn(2, 2, copies * rows, 5).astype("float32")

    def loss(gather):
        return lambda x: ops.sum(gather(x) ** 2 * weights)

    actual = value_and_grads(loss(lambda x: gather_rows(
        x, index, inverse, copies)), x, [])
    expected = value_and_grads(loss(lambda x: ops.take_along_axis(
        x, index[..., None], axis=2)), x, [])
    assert_close(actual[0], expected[0], atol=1e-5)
    assert_close(actual[1], expected[1], atol=1e-5)


@pytest.mark.parametrize("index_batch,index_heads",
                         [(2, 3), (1, 3), (2, 1), (1, 1)])
def test_take_rows_broadcasts_the_index_like_numpy(index_batch, index_heads):
    rng = np.random.RandomState(0)
    x = rng.randn(2, 3, 7, 5).astype("float32")
    index = rng.randint(0, 7, (index_batch, index_heads, 4)).astype("int32")
    expected = np.take_along_axis(
        x, np.broadcast_to(index, (2, 3, 4))[..., None], axis=2)
    assert_close(take_rows(x, index), expected, atol=0)


def test_inverse_permutation_equals_numpys_argsort():
    rng = np.random.RandomState(0)
    order = np.argsort(rng.rand(2, 3, 4, 9), axis=-1).astype("int32")
    assert_close(inverse_permutation(order), np.argsort(order, axis=-1),
                 atol=0)


@pytest.mark.parametrize("num_keys", [5, 2**28 + 1])
def test_order_by_key_equals_numpys_lexsort(num_keys):
    """Small key counts take the combined-key sort; at `2**28 + 1` keys
    and 16 positions the combined key would overflow int32 (the padding
    bucket at 256K tokens does) and the stable argsort is taken."""
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 4, (2, 3, 16)).astype("int32")
    keys[..., ::5] = num_keys - 1
    order = ops.convert_to_numpy(order_by_key(ops.array(keys), num_keys))
    positions = np.broadcast_to(np.arange(16), keys.shape)
    expected = np.lexsort((positions, keys), axis=-1)
    np.testing.assert_array_equal(order, expected)


def test_lsh_gradients_equal_full_attention_when_one_chunk_spans():
    # One chunk holds the whole sequence in every round, so LSH attention is
    # full shared-QK attention, and so must be every gradient.
    lsh = LSHSelfAttention(2, 8, chunk_length=64, num_hashes=3, num_buckets=4,
                           causal=True, seed=1)
    full = FullSelfAttention(2, 8, causal=True, shared_qk=True)
    x = np.random.RandomState(1).randn(2, 37, 24).astype("float32")
    lsh.build(x.shape)
    full.build(x.shape)
    full.set_weights(projection_kernels(lsh))
    mask = np.ones((2, 37), "int32")
    mask[0, :5] = 0

    def loss(layer, **kwargs):
        return lambda x: ops.sum(
            layer(x, padding_mask=mask, **kwargs) ** 2 * mask[..., None])

    actual = value_and_grads(
        loss(lsh, training=True, seed=seed_tensor(3)), x,
        lsh.trainable_variables)
    expected = value_and_grads(loss(full), x, full.trainable_variables)
    assert_close(actual[1], expected[1], atol=1e-4)
    for a, b in zip(actual[2], expected[2]):
        assert_close(a, b, atol=1e-4)


@pytest.mark.parametrize("causal,before,after", [(True, 1, 0), (False, 1, 1)])
def test_lsh_gradients_equal_autodiff_with_padding_chunks(monkeypatch, causal,
                                                          before, after):
    # Many chunks per round and whole chunks of padding (a ring of real
    # chunks and one of padding chunks): every gradient through the
    # layer's gathers must equal autodiff of plain `take_along_axis`.
    layer = LSHSelfAttention(2, 8, chunk_length=4, num_hashes=2,
                             num_buckets=4, causal=causal, seed=1,
                             num_chunks_before=before, num_chunks_after=after)
    x = np.random.RandomState(2).randn(2, 29, 24).astype("float32")
    layer.build(x.shape)
    mask = np.ones((2, 29), "int32")
    mask[0, :9] = 0
    mask[1, 17:] = 0

    def loss(x):
        return ops.sum(layer(x, padding_mask=mask, training=True,
                             seed=seed_tensor(3)) ** 2 * mask[..., None])

    actual = value_and_grads(loss, x, layer.trainable_variables)

    def plain_gather_rows(x, index, inverse, copies=1):
        if len(x.shape) == 4:
            index = index[..., None]
        return ops.take_along_axis(x, index, axis=2)

    monkeypatch.setattr(lsh_self_attention, "gather_rows", plain_gather_rows)
    expected = value_and_grads(loss, x, layer.trainable_variables)
    assert_same_value_and_grads(actual, expected)


def _grouped_and_whole(dropout=0.0, segments="auto"):
    """LSH layers with 4 heads computed 2 at a time (each group's chunks in
    `segments` runs) and all at once, sharing weights."""
    kwargs = dict(num_heads=4, head_dim=8, chunk_length=4, num_hashes=2,
                  num_buckets=4, causal=True, seed=1, dropout=dropout)
    grouped = LSHSelfAttention(parallel_heads=2, segments=segments, **kwargs)
    whole = LSHSelfAttention(**kwargs)
    for layer in (grouped, whole):
        layer.build((2, 29, 24))
    whole.set_weights(grouped.get_weights())
    return grouped, whole


def test_head_groups_equal_all_heads_at_once():
    assert_same_as_whole(*_grouped_and_whole())


@pytest.mark.parametrize("segments", ["auto", 4])
def test_head_groups_gradient_equals_autodiff_with_dropout(monkeypatch,
                                                           segments):
    # Each group's backward from its kept outputs (in runs or not) against
    # autodiff of the same groups unrolled.
    grouped, _ = _grouped_and_whole(dropout=0.3, segments=segments)

    def unrolled_groups(self, inputs, valid, rotations, dropout_seed,
                        kernels, size, runs):
        # The same groups, order and dropout seeds, unrolled, under autodiff.
        query_key = self.project(inputs, kernels[0])
        _, _, indices = self._sort_by_buckets(self._hash(
            lambda g, size: lsh_self_attention._heads(query_key, g * size,
                                                      size),
            rotations, size), valid)
        slicing = [(axis, 0) for axis in lsh_self_attention._HEAD_AXES]
        return sum(self._group_step(
            g, [inputs, *step_views(kernels, g, size, slicing)], indices,
            dropout_seed, size, runs)[0]
            for g in range(self.num_heads // size))

    assert_recomputed_gradient_equals_autodiff(
        grouped, lambda: monkeypatch.setattr(
            LSHSelfAttention, "_attend_head_groups", unrolled_groups))


def _segmented_and_whole(segments, dropout=0.0, parallel_heads=None):
    """LSH layers attending the sorted sequence in `segments` runs and all
    at once, sharing weights (29 tokens, chunks of 4: 16 chunks over the
    2 rounds)."""
    return segmented_and_whole(
        LSHSelfAttention, segments, num_heads=4, head_dim=8, chunk_length=4,
        num_hashes=2, num_buckets=4, causal=True, seed=1, dropout=dropout,
        parallel_heads=parallel_heads)


@pytest.mark.parametrize("segments,parallel_heads", [(4, None), (16, 2)])
def test_segments_equal_the_whole_sorted_sequence(segments, parallel_heads):
    segmented, whole = _segmented_and_whole(segments,
                                            parallel_heads=parallel_heads)
    assert_same_as_whole(segmented, whole)
    x, mask = padded_inputs()
    assert_close(segmented(x, padding_mask=mask),
                 whole(x, padding_mask=mask), atol=1e-5)


def test_segments_recomputed_gradient_equals_autodiff_with_dropout(
        monkeypatch):
    segmented, _ = _segmented_and_whole(4, dropout=0.3)

    assert_recomputed_gradient_equals_autodiff(
        segmented, lambda: monkeypatch.setattr(
            lsh_self_attention, "attention_in_runs", unrolled_runs))


def test_segments_that_do_not_divide_the_chunks_use_a_divisor():
    with pytest.raises(ValueError, match="segments=0"):
        LSHSelfAttention(2, 8, segments=0)
    # 16 chunks (2 rounds of 8) in 6 segments: 4 runs of 4 chunks.
    assert_same_as_whole(*_segmented_and_whole(6))
    assert dividing_runs(6, 16) == 4 and dividing_runs(16, 7) == 7


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="lengths unknown while tracing exist only in "
                    "TensorFlow graphs")
def test_segments_with_a_length_unknown_while_tracing_attend_in_one_run():
    import tensorflow as tf

    segmented, whole = _segmented_and_whole(4)
    x, _ = padded_inputs()
    traced = tf.function(segmented, input_signature=[
        tf.TensorSpec((2, None, 24), "float32")])
    assert_close(traced(x), whole(x), atol=1e-5)
