"""Local self-attention: each chunk attends to itself and its neighbours."""

import keras
from keras import ops

from keras_reformer.layers.chunked_attention import chunked_attention
from keras_reformer.layers.chunked_attention import look_adjacent
from keras_reformer.layers.key_value_attention import KeyValueAttention
from keras_reformer.layers.self_attention_base import pad_to_multiple
from keras_reformer.layers.validation import check_chunk_window
from keras_reformer.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_reformer")
class LocalSelfAttention(KeyValueAttention):
    """Attention within chunks of consecutive positions and their neighbours.

    The sequence is cut into chunks of `chunk_length`; a query attends to the
    keys of its chunk, of `num_chunks_before` preceding and of
    `num_chunks_after` following chunks (no wrap-around), with the masking
    rules of the LSH layer (causal, padding anywhere). Queries, keys and
    values have separate projections; scores are scaled by `head_dim**-0.5`
    (Hugging Face's local attention). Any length is padded internally.

    Args:
        num_heads: int, number of attention heads.
        head_dim: int, size of each head.
        chunk_length: int, tokens per chunk.
        num_chunks_before: int, preceding chunks attended to.
        num_chunks_after: int, following chunks attended to.
        causal: bool, a token never attends to later tokens.
        dropout: float, dropout on attention weights while training.
        seed: int or None, seeds dropout.

    Example:
    >>> layer = LocalSelfAttention(num_heads=2, head_dim=16, chunk_length=8,
    ...                            causal=True)
    >>> layer(keras.random.normal((1, 30, 24))).shape
    (1, 30, 24)
    """

    def __init__(self, num_heads, head_dim, chunk_length=64,
                 num_chunks_before=1, num_chunks_after=0, causal=False,
                 dropout=0.0, seed=None, kernel_initializer="glorot_uniform",
                 **kwargs):
        super().__init__(num_heads, head_dim, shared_qk=False, dropout=dropout,
                         kernel_initializer=kernel_initializer, seed=seed,
                         **kwargs)
        check_positive_int("chunk_length", chunk_length)
        check_chunk_window(causal, num_chunks_before, num_chunks_after)
        self.chunk_length = chunk_length
        self.num_chunks_before = num_chunks_before
        self.num_chunks_after = num_chunks_after
        self.causal = causal

    def _decode_positions(self, index, capacity):
        """The new position's chunk and the `num_chunks_before` before it."""
        window = (1 + self.num_chunks_before) * self.chunk_length
        first = (index // self.chunk_length - self.num_chunks_before) * (
            self.chunk_length)
        return first + ops.arange(window, dtype="int32")

    def _attend(self, inputs, valid, dropout_fn):
        """Outputs `(batch, length, hidden)` and the projections of the
        inputs padded to a multiple of `chunk_length`."""
        batch, length = ops.shape(inputs)[0], ops.shape(inputs)[1]
        inputs, valid = pad_to_multiple(inputs, valid, self.chunk_length)
        padded_length = ops.shape(inputs)[1]
        projections = self.project_all(inputs)
        shape = (batch, self.num_heads, padded_length)
        positions = ops.broadcast_to(
            ops.arange(padded_length, dtype="int32"), shape)
        key_valid = ops.broadcast_to(valid[:, None, :], shape)
        num_chunks = padded_length // self.chunk_length

        def windows(x):
            chunks = ops.reshape(x, (batch, self.num_heads, num_chunks,
                                     self.chunk_length) + tuple(x.shape[3:]))
            adjacent = look_adjacent(chunks, self.num_chunks_before,
                                     self.num_chunks_after)
            return ops.reshape(adjacent, (batch, self.num_heads, -1)
                               + tuple(x.shape[3:]))

        # A neighbour that wrapped around (or repeats, with few chunks) is
        # masked by its exact chunk offset.
        offsets = ops.repeat(ops.arange(
            -self.num_chunks_before, self.num_chunks_after + 1,
            dtype="int32"), self.chunk_length)
        queries, keys, values = projections
        outputs, _ = chunked_attention(
            queries, windows(keys), windows(values), positions,
            windows(positions), windows(key_valid), self.chunk_length,
            self.causal, mask_self=False, dropout_fn=dropout_fn,
            window=(self.chunk_length, offsets))
        return self.merge_heads(outputs, valid)[:, :length], projections

    def get_config(self):
        config = super().get_config()
        config.update({
            "chunk_length": self.chunk_length,
            "num_chunks_before": self.num_chunks_before,
            "num_chunks_after": self.num_chunks_after,
            "causal": self.causal,
        })
        return config
