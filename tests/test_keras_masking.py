"""The layers take Keras's own masks (`Embedding(mask_zero=True)`) as
padding and pass them on, as Keras's attention layers do."""

import keras
import numpy as np
import pytest

from keras_reformer.layers import ChunkedFeedForward
from keras_reformer.layers import FullSelfAttention
from keras_reformer.layers import LinformerSelfAttention
from keras_reformer.layers import LocalSelfAttention
from keras_reformer.layers import LSHSelfAttention
from keras_reformer.layers import PreNormBranch
from keras_reformer.layers import ReversibleBlock
from keras_reformer.layers import ReversibleStack
from tests.helpers import assert_close
from tests.helpers import to_numpy

ATTENTIONS = {
    "lsh": lambda: LSHSelfAttention(2, 8, chunk_length=4, num_buckets=4,
                                    causal=False, num_chunks_after=1, seed=1),
    "local": lambda: LocalSelfAttention(2, 8, chunk_length=4, causal=False,
                                        num_chunks_after=1, seed=1),
    "full": lambda: FullSelfAttention(2, 8, causal=False, seed=1),
    "linformer": lambda: LinformerSelfAttention(
        2, 8, max_length=16, projected_length=4, seed=1),
}
REAL = np.array([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]])


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_a_propagated_mask_is_the_padding_mask(name):
    ids = keras.Input((None,), dtype="int32")
    embedding = keras.layers.Embedding(20, 16, mask_zero=True)
    attention = ATTENTIONS[name]()
    x = ChunkedFeedForward(32, chunk_length=4)(attention(embedding(ids)))
    pooled = keras.Model(ids, keras.layers.GlobalAveragePooling1D()(x))
    padded = np.concatenate([REAL, np.zeros((1, 5), "int32")], axis=1)

    # Padding changes nothing, and the pooling after the layers sees the
    # mask (a mean over the real tokens only).
    assert_close(pooled(padded), pooled(REAL), atol=1e-5)
    # The propagated mask acts as the explicit padding_mask (numpy vectors:
    # an eager Embedding output would carry its mask along).
    vectors = to_numpy(embedding(padded))
    assert_close(attention(vectors, mask=padded > 0),
                 attention(vectors, padding_mask=padded > 0), atol=0)
    # Both together: a token is real only where both masks say so.
    first_half = np.arange(padded.shape[1])[None] < 6
    assert_close(attention(vectors, mask=padded > 0, padding_mask=first_half),
                 attention(vectors, padding_mask=first_half), atol=1e-6)
    assert np.abs(to_numpy(attention(vectors, mask=padded > 0))
                  - to_numpy(attention(vectors))).max() > 1e-3


def test_a_reversible_stack_takes_and_passes_on_the_mask():
    """Embedding(mask_zero=True) -> [x, x] -> reversible stack of pre-norm
    LSH and feed-forward branches -> pooling: padding changes nothing."""
    ids = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(20, 16, mask_zero=True)(ids)
    x = keras.layers.Concatenate()([x, x])
    stack = ReversibleStack([ReversibleBlock(
        PreNormBranch(ATTENTIONS["lsh"]()),
        PreNormBranch(ChunkedFeedForward(32, chunk_length=4)))
        for _ in range(2)])
    pooled = keras.Model(
        ids, keras.layers.GlobalAveragePooling1D()(stack(x)))
    padded = np.concatenate([REAL, np.zeros((1, 5), "int32")], axis=1)
    assert_close(pooled(padded), pooled(REAL), atol=1e-5)
